"""The KL budget: lambda solved per selection so that the weights' KL from uniform stays
within a budget, as close to it as bisection gets whenever the budget is reachable."""

from __future__ import annotations

import math
import random

import pytest
from fakes import FakeBackend, FakeScorer
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import SBoNDefaults
from engine.resolve import SBoNOverrides, SettingsError, resolve_params
from engine.sbon import SBoNEngine
from engine.selection import kl_from_uniform, lambda_for_kl_budget, select, selection_weights
from engine.types import Candidate, SamplingSettings, SBoNParams

# Bisection stops at a relative lambda step of 1e-12; the KL it reaches is this close.
TOLERANCE = 1e-6

# Rewards on a grid of 1e-6: distinct rewards a denormal apart have no lambda that tells
# them apart in floating point (the solver then keeps within budget, but cannot spend it).
rewards_lists = st.lists(st.floats(min_value=-50, max_value=50, allow_nan=False,
                                   allow_infinity=False).map(lambda x: round(x, 6)),
                         min_size=2, max_size=16)


def achieved(rewards: list[float], budget: float) -> float:
    return kl_from_uniform(selection_weights(rewards, lambda_for_kl_budget(rewards, budget)))


@settings(max_examples=300, deadline=None)
@given(rewards=rewards_lists, fraction=st.floats(min_value=0.0, max_value=1.2))
def test_achieved_kl_is_within_the_budget_and_close_to_it(rewards: list[float],
                                                           fraction: float) -> None:
    hard = kl_from_uniform(selection_weights(rewards, 0.0))
    budget = fraction * math.log(len(rewards))
    kl = achieved(rewards, budget)
    assert kl <= budget + 1e-12
    if budget < hard:  # reachable and binding: the solver spends the budget
        assert kl == pytest.approx(budget, abs=TOLERANCE)


@settings(max_examples=200, deadline=None)
@given(rewards=rewards_lists, a=st.floats(0, 3), b=st.floats(0, 3))
def test_lambda_falls_as_the_budget_grows(rewards: list[float], a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert lambda_for_kl_budget(rewards, high) <= lambda_for_kl_budget(rewards, low)


def test_the_ends_of_the_dial() -> None:
    rewards = [0.1, 0.7, -0.3, 2.0]
    assert lambda_for_kl_budget(rewards, math.log(4)) == 0.0  # hard best-of-n
    assert lambda_for_kl_budget(rewards, 10.0) == 0.0
    assert lambda_for_kl_budget(rewards, 0.0) == math.inf  # uniform: the base model
    assert lambda_for_kl_budget([1.0, 1.0, 1.0], 0.0) == 0.0  # nothing to choose between
    with pytest.raises(ValueError, match="kl_budget"):
        lambda_for_kl_budget(rewards, -0.1)


def test_never_choose_rewards_keep_their_floor() -> None:
    # With one candidate excluded (-inf), even the uniform pick is log(4/3) from uniform.
    rewards = [0.0, 1.0, 2.0, -math.inf]
    floor = math.log(4 / 3)
    assert lambda_for_kl_budget(rewards, floor / 2) == math.inf
    assert achieved(rewards, floor + 0.1) == pytest.approx(floor + 0.1, abs=TOLERANCE)


def test_select_reports_the_lambda_it_used() -> None:
    selection = select([0.0, 1.0, 3.0], 5.0, random.Random(0), kl_budget=0.2)
    assert selection.lam == pytest.approx(lambda_for_kl_budget([0.0, 1.0, 3.0], 0.2))
    assert selection.kl_from_uniform == pytest.approx(0.2, abs=TOLERANCE)
    assert select([0.0, 1.0], 5.0, random.Random(0)).lam == 5.0


async def test_every_block_solves_its_own_lambda() -> None:
    backend = FakeBackend(script=lambda call, i: Candidate(
        (i + 1,) * 4, f"w{i} " * (i + 1), -1.0, None))
    engine = SBoNEngine(backend, {"fake": FakeScorer()}, "fake")
    result = await engine.run("p", SBoNParams(n=4, block_size=4, kl_budget=0.3),
                              SamplingSettings(max_tokens=12, seed=2), "kl")
    assert len(result.blocks) == 3
    for block in result.blocks:
        assert 0 < block.lam < math.inf
        assert block.kl_from_uniform == pytest.approx(0.3, abs=TOLERANCE)
    assert result.diagnostics.kl_from_uniform == pytest.approx(0.9, abs=3 * TOLERANCE)


def test_lambda_and_budget_exclude_each_other_and_a_delimiter_needs_a_block_size() -> None:
    defaults = SBoNDefaults()
    with pytest.raises(SettingsError) as both:
        resolve_params(defaults, SBoNOverrides(lam=1.0, kl_budget=0.5))
    assert both.value.param == "kl_budget"
    with pytest.raises(SettingsError) as step:
        resolve_params(defaults, SBoNOverrides(block_delimiter="\n\n"))
    assert step.value.param == "block_delimiter"
    # A configured budget applies unless the request gives a lambda.
    budgeted = SBoNDefaults(kl_budget=0.4)
    assert resolve_params(budgeted, SBoNOverrides()).kl_budget == 0.4
    assert resolve_params(budgeted, SBoNOverrides(lam=2.0)).kl_budget is None
    stepped = SBoNOverrides(kl_budget=0.1, block_size=8, block_size_given=True,
                            block_delimiter=".")
    assert resolve_params(defaults, stepped).block_delimiter == "."
