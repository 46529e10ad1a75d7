"""Builds the configured reward scorers by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.config import (
    HFRewardConfig,
    PRMRewardConfig,
    PythonRewardConfig,
    RewardConfig,
    VLLMRewardConfig,
)
from reward.base import RewardScorer
from reward.judge import JudgeEngine, JudgeScorer
from reward.vllm_reward import ClassifierEngine

ClassifierFactory = Callable[[VLLMRewardConfig], ClassifierEngine]


def build_scorer(config: RewardConfig, judge_source: JudgeEngine | None,
                 classifier_engine: ClassifierFactory | None = None) -> RewardScorer:
    """One scorer for one configuration entry; ``judge`` needs the serving engine and
    ``vllm`` a factory of pooling engines."""
    if isinstance(config, VLLMRewardConfig):
        from reward.vllm_reward import VLLMRewardScorer

        if classifier_engine is None:
            raise ValueError(f"reward '{config.name}': type 'vllm' needs a pooling engine")
        return VLLMRewardScorer(config, classifier_engine(config))
    if isinstance(config, HFRewardConfig):
        from reward.hf import HFRewardScorer

        return HFRewardScorer(config)
    if isinstance(config, PRMRewardConfig):
        from reward.prm import PRMScorer

        return PRMScorer(config)
    if isinstance(config, PythonRewardConfig):
        from reward.python_fn import PythonScorer

        return PythonScorer(config)
    if judge_source is None:
        raise ValueError(f"reward '{config.name}': the judge needs the generation engine")
    return JudgeScorer(config, judge_source)


def build_scorers(
    configs: Sequence[RewardConfig], judge_source: JudgeEngine | None,
    classifier_engine: ClassifierFactory | None = None,
) -> dict[str, RewardScorer]:
    """Every configured reward, keyed by name."""
    return {c.name: build_scorer(c, judge_source, classifier_engine) for c in configs}
