"""Builds the configured reward scorers by name."""

from __future__ import annotations

from collections.abc import Sequence

from reward.base import RewardScorer
from reward.config import RewardConfig
from reward.judge import JudgeScorer, LabelLogprobSource


def build_scorer(config: RewardConfig, judge_source: LabelLogprobSource | None) -> RewardScorer:
    """One scorer for one configuration entry; ``judge`` needs the serving engine."""
    if config.type == "hf":
        from reward.hf import HFRewardScorer

        return HFRewardScorer(config)
    if config.type == "python":
        from reward.python_fn import PythonScorer

        return PythonScorer(config)
    if judge_source is None:
        raise ValueError(f"reward '{config.name}': the judge needs the generation engine")
    return JudgeScorer(config, judge_source)


def build_scorers(
    configs: Sequence[RewardConfig], judge_source: LabelLogprobSource | None
) -> dict[str, RewardScorer]:
    return {c.name: build_scorer(c, judge_source) for c in configs}
