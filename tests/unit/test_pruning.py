"""The pure pruning rules (engine/pruning.py): rank, bound, weight bounds, pruned mass."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.prune import PruneSettings
from engine.pruning import (
    Pruner,
    aligned_checkpoints,
    bound_prune,
    checkpoints,
    pruned_mass,
    rank_prune,
    weight_upper_bound,
)
from engine.selection import selection_weights


def test_checkpoints_stop_before_the_last_token() -> None:
    assert checkpoints(16, 64) == [16, 32, 48]
    assert checkpoints(16, 65) == [16, 32, 48, 64]
    assert checkpoints(16, 16) == [] and checkpoints(100, 64) == []


def test_aligned_checkpoints_end_prompt_and_response_on_a_kv_block_boundary() -> None:
    # prompt 40 tokens, blocks of 32: boundaries at response lengths 24, 56, 88, ...
    assert aligned_checkpoints(16, 64, 40, 32) == [24, 56]
    assert aligned_checkpoints(16, 64, 64, 32) == [32]  # 16 -> 32 and 32 -> 32 merge
    assert all((40 + c) % 32 == 0 for c in aligned_checkpoints(8, 200, 40, 32))
    # no block size, or no boundary before the end: the nominal checkpoints
    assert aligned_checkpoints(16, 64, 40, None) == [16, 32, 48]
    assert aligned_checkpoints(16, 64, 10, 128) == [16, 32, 48]


@given(st.integers(1, 64), st.integers(2, 300), st.integers(0, 500), st.integers(1, 64))
def test_aligned_checkpoints_are_increasing_and_never_earlier(every: int, max_tokens: int,
                                                              prompt: int, block: int) -> None:
    nominal = checkpoints(every, max_tokens)
    aligned = aligned_checkpoints(every, max_tokens, prompt, block)
    assert aligned == sorted(set(aligned)) and len(aligned) <= len(nominal)
    assert all(0 < c < max_tokens for c in aligned)
    if aligned != nominal:
        assert all((prompt + c) % block == 0 for c in aligned)
        assert aligned[0] >= nominal[0] and aligned[0] - nominal[0] < block


def test_rank_keeps_the_top_fraction_of_the_live_candidates() -> None:
    partial = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3, 4: 0.7, 5: -math.inf}
    pruned = rank_prune(partial, running=set(partial), keep=0.5, min_keep=1)
    assert pruned == [0, 3, 5]  # kept 1, 4, 2: the best three of six


def test_rank_never_prunes_finished_candidates_and_respects_min_keep() -> None:
    partial = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3}
    assert rank_prune(partial, running={1, 2, 3}, keep=0.25, min_keep=1) == [2, 3]
    assert rank_prune(partial, running=set(partial), keep=0.25, min_keep=3) == [0]


def test_rank_breaks_ties_by_index() -> None:
    partial = {3: 1.0, 1: 1.0, 2: 1.0, 0: 1.0}
    assert rank_prune(partial, running=set(partial), keep=0.5, min_keep=1) == [2, 3]


def _worst_weight(index: int, upper: float, lower: list[float], lam: float) -> float:
    """The weight of ``index`` at the corner the bound assumes: r_i = U_i, r_j = L_j."""
    rewards = list(lower)
    rewards[index] = upper
    return selection_weights(rewards, lam)[index]


@pytest.mark.parametrize("lam", [0.1, 1.0, 7.0, math.inf])
def test_the_weight_bound_is_attained_at_the_corner_and_holds_inside(lam: float) -> None:
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(2, 6)
        lower = [rng.uniform(-3, 3) for _ in range(n)]
        upper = [low + rng.uniform(0, 2) for low in lower]
        i = rng.randrange(n)
        bound = weight_upper_bound(i, upper[i], lower, lam)
        assert bound == pytest.approx(_worst_weight(i, upper[i], lower, lam), rel=1e-6)
        inside = [rng.uniform(lo, hi) for lo, hi in zip(lower, upper, strict=True)]
        assert selection_weights(inside, lam)[i] <= bound


def test_at_lambda_zero_only_a_candidate_that_cannot_tie_has_weight_bound_zero() -> None:
    lower = [1.0, 0.0, 0.0]
    assert weight_upper_bound(1, 0.5, lower, 0.0) == 0.0  # 0.5 < 1.0: can never win
    assert weight_upper_bound(1, 1.0, lower, 0.0) == 1.0  # can tie: never pruned for free
    decision = bound_prune(lower=[1.0, 0.0, 0.0], upper=[1.0, 1.0, 0.9], live={0, 1, 2},
                           running={1, 2}, lam=0.0, budget=0.0, min_keep=1)
    assert decision.pruned == [2] and decision.weight_bounds == {2: 0.0}


def test_never_choose_candidates_have_weight_bound_zero() -> None:
    assert weight_upper_bound(0, -math.inf, [0.0, 1.0], 1.0) == 0.0
    assert weight_upper_bound(0, 2.0, [-math.inf, -math.inf, 1.0], math.inf) == 0.5


def test_bound_pruning_spends_the_budget_smallest_bound_first() -> None:
    lower = [5.0, -1.0, -2.0, -3.0]
    upper = [5.0, 0.0, -1.0, -2.5]
    decision = bound_prune(lower, upper, live={0, 1, 2, 3}, running={1, 2, 3}, lam=1.0,
                           budget=0.005, min_keep=1)
    bounds = {i: weight_upper_bound(i, upper[i], lower, 1.0) for i in (1, 2, 3)}
    assert bounds[3] < bounds[2] < 0.005 < bounds[1]
    assert bounds[3] + bounds[2] <= 0.005
    assert decision.pruned == [2, 3]
    assert sum(decision.weight_bounds.values()) == pytest.approx(bounds[2] + bounds[3])


def test_bound_pruning_keeps_min_keep_candidates() -> None:
    decision = bound_prune([0.0] * 4, [-10.0] * 4, live={0, 1, 2, 3}, running={0, 1, 2, 3},
                           lam=0.0, budget=1.0, min_keep=2)
    assert len(decision.pruned) == 2


def _tv(weights: list[float], pruned: set[int]) -> float:
    """Total variation between selection over all and over the survivors, computed directly."""
    kept = sum(w for i, w in enumerate(weights) if i not in pruned)
    after = [0.0 if i in pruned else w / kept for i, w in enumerate(weights)]
    return 0.5 * sum(abs(a - b) for a, b in zip(weights, after, strict=True))


def test_the_pruned_mass_is_the_total_variation_distance() -> None:
    rng = random.Random(11)
    for _ in range(100):
        n = rng.randint(2, 8)
        weights = selection_weights([rng.gauss(0, 1) for _ in range(n)], rng.uniform(0.1, 3))
        pruned = {i for i in range(n) if rng.random() < 0.5} - {rng.randrange(n)}
        pruned_at = [16 if i in pruned else None for i in range(n)]
        assert pruned_mass(weights, pruned_at) == pytest.approx(_tv(weights, pruned), abs=1e-12)


@st.composite
def _bounded_runs(draw: st.DrawFn) -> tuple[list[float], list[int], list[list[tuple[float, float]]],
                                            float, float, int]:
    n = draw(st.integers(2, 8))
    steps = draw(st.integers(1, 4))
    finite = st.floats(-5, 5, allow_nan=False)
    rewards = draw(st.lists(st.one_of(finite, finite, finite, st.just(-math.inf)),
                            min_size=n, max_size=n))
    if all(r == -math.inf for r in rewards):
        rewards[0] = 0.0
    finish = draw(st.lists(st.integers(1, steps + 1), min_size=n, max_size=n))
    widths = st.one_of(st.floats(0, 3), st.just(math.inf))
    bounds = []
    for _ in range(steps):
        row = []
        for r in rewards:
            below, above = draw(widths), draw(widths)
            row.append((r - below if r > -math.inf else -math.inf,
                        r + above if r > -math.inf or above == math.inf else -math.inf))
        bounds.append(row)
    lam = draw(st.one_of(st.just(0.0), st.just(math.inf), st.floats(0.01, 10)))
    epsilon = draw(st.floats(0, 1))
    min_keep = draw(st.integers(1, n))
    return rewards, finish, bounds, lam, epsilon, min_keep


@settings(max_examples=400, deadline=None)
@given(_bounded_runs())
def test_bound_pruning_never_moves_more_than_epsilon(
        run: tuple[list[float], list[int], list[list[tuple[float, float]]], float, float, int]
) -> None:
    rewards, finish, bounds, lam, epsilon, min_keep = run
    n = len(rewards)
    pruner = Pruner(PruneSettings(mode="bound", epsilon=epsilon, min_keep=min_keep), n, lam)
    for step, row in enumerate(bounds, start=1):
        live = pruner.live
        running = {i for i in live if finish[i] > step}
        if not running or len(live) <= min_keep:
            break
        pruner.bound_step(step * 16, {i: row[i] for i in running},
                          {i: rewards[i] for i in live - running}, running)
    weights = selection_weights(rewards, lam)
    assert pruned_mass(weights, pruner.pruned_at) <= epsilon + 1e-12
    assert pruner.spent <= epsilon + 1e-12
    assert len(pruner.live) >= min(min_keep, n)


def test_every_subset_check_of_the_bound_rule_on_a_small_case() -> None:
    # Exhaustive over which candidates finish first: the guarantee holds in each order.
    rewards = [0.3, 0.2, -0.4, 1.0]
    for finish in itertools.product((1, 2, 3), repeat=4):
        pruner = Pruner(PruneSettings(mode="bound", epsilon=0.2), 4, 0.5)
        for step in (1, 2):
            running = {i for i in pruner.live if finish[i] > step}
            if not running:
                break
            pruner.bound_step(step, {i: (rewards[i] - 0.1, rewards[i] + 0.1) for i in running},
                              {i: rewards[i] for i in pruner.live - running}, running)
        assert pruned_mass(selection_weights(rewards, 0.5), pruner.pruned_at) <= 0.2 + 1e-12
