"""Builds the configured reward scorers: one factory per reward ``type``.

Adding a reward backend is one entry in :data:`FACTORIES` (and its configuration class in
common/config.py); model backends are imported only when configured, so a server without
them never loads torch or transformers for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import (
    HFRewardConfig,
    JudgeRewardConfig,
    PRMRewardConfig,
    PythonRewardConfig,
    RewardConfig,
    VLLMRewardConfig,
)
from reward.base import RewardScorer
from reward.judge import JudgeEngine, JudgeScorer
from reward.vllm_reward import ClassifierEngine

ClassifierFactory = Callable[[VLLMRewardConfig], ClassifierEngine]


@dataclass(frozen=True)
class Sources:
    """What some rewards need from the process: the serving engine (``judge``) and a
    factory of pooling engines (``vllm``)."""

    judge_source: JudgeEngine | None = None
    classifier_engine: ClassifierFactory | None = None


def _vllm(config: VLLMRewardConfig, sources: Sources) -> RewardScorer:
    from reward.vllm_reward import VLLMRewardScorer

    if sources.classifier_engine is None:
        raise ValueError(f"reward '{config.name}': type 'vllm' needs a pooling engine")
    return VLLMRewardScorer(config, sources.classifier_engine(config))


def _hf(config: HFRewardConfig, sources: Sources) -> RewardScorer:
    from reward.hf import HFRewardScorer

    return HFRewardScorer(config)


def _prm(config: PRMRewardConfig, sources: Sources) -> RewardScorer:
    from reward.prm import PRMScorer

    return PRMScorer(config)


def _python(config: PythonRewardConfig, sources: Sources) -> RewardScorer:
    from reward.python_fn import python_scorer

    return python_scorer(config)


def _judge(config: JudgeRewardConfig, sources: Sources) -> RewardScorer:
    if sources.judge_source is None:
        raise ValueError(f"reward '{config.name}': the judge needs the generation engine")
    return JudgeScorer(config, sources.judge_source)


# ``type`` -> factory; each factory takes its own configuration class (common/config.py).
FACTORIES: Mapping[str, Callable[[Any, Sources], RewardScorer]] = {
    "hf": _hf, "vllm": _vllm, "prm": _prm, "python": _python, "judge": _judge,
}


def build_scorer(config: RewardConfig, judge_source: JudgeEngine | None,
                 classifier_engine: ClassifierFactory | None = None) -> RewardScorer:
    """One scorer for one configuration entry; ``judge`` needs the serving engine and
    ``vllm`` a factory of pooling engines."""
    return FACTORIES[config.type](config, Sources(judge_source, classifier_engine))


def build_scorers(
    configs: Sequence[RewardConfig], judge_source: JudgeEngine | None,
    classifier_engine: ClassifierFactory | None = None,
) -> dict[str, RewardScorer]:
    """Every configured reward, keyed by name."""
    return {c.name: build_scorer(c, judge_source, classifier_engine) for c in configs}
