"""A python reward with a ``bounds`` companion: a declared BoundedScorer, checked values."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from common.config import PythonRewardConfig
from engine.guarded import RewardFailure, guard
from reward.base import BoundedScorer, RewardBounds, RewardError
from reward.python_fn import BoundedPythonScorer, PythonScorer
from reward.registry import build_scorer

BAD: dict[str, Any] = {"value": (0.0, 1.0)}


def _bad_bounds(prompt: str, partial: str) -> Any:
    return BAD["value"]


async def _async_bounds(prompt: str, partial: str) -> tuple[float, float]:
    return -1.0, float(len(partial))


def _config(bounds: str | None, function: str = "reward.verifiers:constraint_reward"
            ) -> PythonRewardConfig:
    return PythonRewardConfig(name="checks", type="python", function=function, bounds=bounds)


def test_bounds_make_the_scorer_a_declared_bounded_scorer() -> None:
    plain = build_scorer(_config(None), None)
    bounded = build_scorer(_config("reward.verifiers:constraint_bounds"), None)
    assert type(plain) is PythonScorer and not isinstance(plain, BoundedScorer)
    assert isinstance(bounded, BoundedPythonScorer) and isinstance(bounded, BoundedScorer)


def test_bounds_spec_is_validated_like_the_function() -> None:
    for spec in ("no colon", "reward.verifiers:", "1bad:f", ""):
        with pytest.raises(ValidationError):
            _config(spec)
    with pytest.raises(ValueError):
        BoundedPythonScorer(_config("reward.verifiers:absent"))


async def test_bounds_are_called_per_pair() -> None:
    scorer = BoundedPythonScorer(_config("reward.verifiers:constraint_bounds"))
    prompt = "Say hi. Do not use the letter 'z'. Write at least 2 words."
    got = await scorer.bounds([prompt, prompt, prompt], ["zz", "hi there ", ""])
    assert got == [RewardBounds(0.0, 0.5), RewardBounds(0.5, 1.0), RewardBounds(0.0, 1.0)]
    async_scorer = BoundedPythonScorer(_config(f"{__name__}:_async_bounds"))
    assert await async_scorer.bounds(["p"], ["abc"]) == [RewardBounds(-1.0, 3.0)]
    await scorer.close()


@pytest.mark.parametrize("value", [(2.0, 1.0), (math.nan, 1.0), (0.0, math.nan),
                                   (math.inf, math.inf), "ab", (1.0,), None, (0, 10**400)])
async def test_bad_bounds_fail_like_bad_rewards(value: Any) -> None:
    BAD["value"] = value
    scorer = BoundedPythonScorer(_config(f"{__name__}:_bad_bounds"))
    try:
        with pytest.raises(RewardError, match="'checks'"):
            await scorer.bounds(["p"], ["r"])
    finally:
        BAD["value"] = (0.0, 1.0)
        await scorer.close()


async def test_infinite_bounds_are_allowed() -> None:
    BAD["value"] = (-math.inf, math.inf)
    try:
        scorer = BoundedPythonScorer(_config(f"{__name__}:_bad_bounds"))
        assert await scorer.bounds(["p"], ["r"]) == [RewardBounds(-math.inf, math.inf)]
    finally:
        BAD["value"] = (0.0, 1.0)


async def test_guarded_bounds_failure_names_the_reward() -> None:
    """Through the guard every scorer runs behind, a bad bound is the reward's failure."""
    BAD["value"] = (3.0, 1.0)
    guarded = guard(BoundedPythonScorer(_config(f"{__name__}:_bad_bounds")))
    try:
        assert guarded.has_bounds
        with pytest.raises(RewardFailure) as caught:
            await guarded.reward_bounds(["p"], ["r"])
        assert caught.value.reward == "checks"
    finally:
        BAD["value"] = (0.0, 1.0)
