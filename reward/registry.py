"""Builds the configured reward scorers by name."""

from __future__ import annotations

from collections.abc import Sequence

from common.config import HFRewardConfig, PythonRewardConfig, RewardConfig
from reward.base import RewardScorer
from reward.judge import JudgeScorer, LabelLogprobSource


def build_scorer(config: RewardConfig, judge_source: LabelLogprobSource | None) -> RewardScorer:
    """One scorer for one configuration entry; ``judge`` needs the serving engine."""
    if isinstance(config, HFRewardConfig):
        from reward.hf import HFRewardScorer

        return HFRewardScorer(config)
    if isinstance(config, PythonRewardConfig):
        from reward.python_fn import PythonScorer

        return PythonScorer(config)
    if judge_source is None:
        raise ValueError(f"reward '{config.name}': the judge needs the generation engine")
    return JudgeScorer(config, judge_source)


def build_scorers(
    configs: Sequence[RewardConfig], judge_source: LabelLogprobSource | None
) -> dict[str, RewardScorer]:
    """Every configured reward, keyed by name."""
    return {c.name: build_scorer(c, judge_source) for c in configs}
