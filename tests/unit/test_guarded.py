"""The reward guard (deadline, finite values, health), -inf in the selection rule, and the
hf scorer's per-request retry of a failed shared batch."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

import pytest
from fakes import FakeScorer
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import HFRewardConfig
from common.prompts import Prompt
from engine.backend import BackendError
from engine.guarded import GuardedScorer, RewardFailure, guard
from engine.selection import normalize_rewards, select, selection_weights
from reward.base import RewardError
from reward.hf import HFRewardScorer, _Item


class NeverChoose(FakeScorer):
    never_choose_negative_infinity = True


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "x", None])
async def test_values_that_are_not_finite_numbers_fail(value: object) -> None:
    guarded = GuardedScorer(FakeScorer(fn=lambda r: 0.0))
    with pytest.raises(RewardFailure) as caught:
        guarded.check([1.0, value], 2)
    assert caught.value.kind == "invalid" and caught.value.reward == "fake"
    assert guarded.status()["state"] == "failing"
    assert guarded.check([1.0, 2.0], 2) == [1.0, 2.0]
    assert guarded.status()["state"] == "ok"  # a success clears the failing state


async def test_minus_infinity_is_allowed_only_where_declared_and_never_for_all() -> None:
    guarded = guard(NeverChoose(fn=lambda r: 0.0))
    assert guarded.check([-math.inf, 1.0], 2) == [-math.inf, 1.0]
    with pytest.raises(RewardFailure):
        guarded.check([-math.inf, -math.inf], 2)
    with pytest.raises(RewardFailure):
        guarded.check([1.0], 2)  # a value per response


async def test_a_slow_scorer_times_out_and_its_work_is_cancelled() -> None:
    cancelled = asyncio.Event()

    class Slow(FakeScorer):
        async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return []

    guarded = GuardedScorer(Slow(), timeout_s=0.05)
    with pytest.raises(RewardFailure) as caught:
        await guarded.score(["p"], ["r"])
    assert caught.value.kind == "timeout" and cancelled.is_set()
    assert guarded.status()["last_failure"] == "timeout" and guarded.status()["in_flight"] == 0


async def test_engine_errors_pass_through_and_bugs_stay_bugs() -> None:
    class EngineDown(FakeScorer):
        async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
            raise BackendError("engine dead")

    class Bug(FakeScorer):
        async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
            raise ZeroDivisionError()

    engine_down = guard(EngineDown())
    with pytest.raises(BackendError):
        await engine_down.score(["p"], ["r"])
    assert engine_down.status()["state"] == "ok"
    with pytest.raises(ZeroDivisionError):
        await guard(Bug()).score(["p"], ["r"])
    assert guard(engine_down) is engine_down  # guarding twice is guarding once


def test_the_configured_timeout_reaches_the_guard() -> None:
    assert GuardedScorer(FakeScorer(timeout_s=3.5)).timeout_s == 3.5
    assert GuardedScorer(FakeScorer(timeout_s=3.5), timeout_s=0.5).timeout_s == 0.5


finite = st.floats(min_value=-50, max_value=50, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(rewards=st.lists(st.one_of(finite, st.just(-math.inf)), min_size=1, max_size=8)
       .filter(lambda rs: any(r != -math.inf for r in rs)),
       lam=st.one_of(st.just(0.0), st.just(math.inf), st.floats(min_value=0.01, max_value=10)),
       mode=st.sampled_from(["raw", "zscore"]), seed=st.integers(0, 2**32))
def test_minus_infinity_gets_weight_zero_and_is_never_chosen(rewards: list[float], lam: float,
                                                             mode: str, seed: int) -> None:
    selection = select(rewards, lam, random.Random(seed), mode)
    assert math.isclose(sum(selection.weights), 1.0)
    assert all(math.isfinite(w) and w >= 0 for w in selection.weights)
    for reward, weight in zip(rewards, selection.weights, strict=True):
        if reward == -math.inf:
            assert weight == 0.0
    assert rewards[selection.chosen_index] != -math.inf
    assert math.isfinite(selection.ess) and math.isfinite(selection.kl_from_uniform)


def test_normalisation_leaves_minus_infinity_out_of_the_statistics() -> None:
    assert normalize_rewards([1.0, -math.inf, 3.0], "zscore") == [-1.0, -math.inf, 1.0]
    assert selection_weights([-math.inf, 2.0, 2.0], math.inf) == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError):
        selection_weights([math.inf, 1.0], 1.0)


async def test_a_failed_hf_batch_is_retried_request_by_request() -> None:
    scorer = HFRewardScorer(HFRewardConfig(name="rm", type="hf", model="unused",
                                           batch_wait_ms=50))
    batches: list[list[str]] = []

    def score_items(items: list[_Item]) -> list[float]:
        batches.append([i.full for i in items])
        if any("poison" in i.full for i in items):
            raise RuntimeError("the model cannot take this input")
        return [float(len(i.full)) for i in items]

    scorer._score_items = score_items  # type: ignore[method-assign]
    scorer._encode_pairs = lambda prompts, responses: (  # type: ignore[method-assign]
        [_Item((), f"{p}|{r}") for p, r in zip(prompts, responses, strict=True)],  # type: ignore[arg-type]
        False)
    scorer._batcher.start()
    try:
        good, bad = await asyncio.gather(scorer.score(["q"], ["fine"]),
                                         scorer.score(["q"], ["poison"]),
                                         return_exceptions=True)
    finally:
        await scorer.close()
    assert good == [float(len("q|fine"))]
    assert isinstance(bad, RewardError)
    assert batches[0] == ["q|fine", "q|poison"]  # one shared batch first, then one by one
    assert sorted(map(tuple, batches[1:])) == [("q|fine",), ("q|poison",)]
