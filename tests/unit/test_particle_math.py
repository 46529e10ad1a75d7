"""The pure arithmetic of particles: weight increments, ESS, systematic resampling."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.particle_math import (
    add_increment,
    ess,
    needs_resampling,
    particle_weights,
    systematic_resample,
)


def test_increments_telescope_to_the_final_reward() -> None:
    rewards = [0.0, 0.7, -0.2, 1.5]  # r_0 = 0, then r_1, r_2, r_3
    accumulated = 0.0
    for previous, current in itertools.pairwise(rewards):
        accumulated = add_increment(accumulated, previous, current)
    assert accumulated == pytest.approx(1.5)
    assert add_increment(0.3, 1.0, -math.inf) == -math.inf
    assert add_increment(-math.inf, -math.inf, 2.0) == -math.inf  # never NaN


def test_weights_follow_lambda_including_its_limits() -> None:
    assert particle_weights([0.0, math.log(3.0)], 1.0) == pytest.approx([0.25, 0.75])
    assert particle_weights([1.0, 2.0, 2.0], 0.0) == [0.0, 0.5, 0.5]
    assert particle_weights([1.0, 5.0, -math.inf], math.inf) == [0.5, 0.5, 0.0]


def test_ess_is_n_for_equal_weights_and_one_for_a_single_one() -> None:
    assert ess([2.0, 2.0, 2.0, 2.0]) == pytest.approx(4.0)
    assert ess([0.0, 3.0, 0.0]) == pytest.approx(1.0)
    assert ess([0.5, 0.25, 0.25]) == pytest.approx(1 / (0.25 + 0.0625 + 0.0625))
    assert not needs_resampling([1.0] * 4, 1.0)
    assert needs_resampling([0.7, 0.1, 0.1, 0.1], 0.5)  # ESS 1.92 < 2
    assert not needs_resampling([0.4, 0.2, 0.2, 0.2], 0.5)  # ESS 3.57
    with pytest.raises(ValueError):
        ess([0.0, 0.0])


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=12)
       .filter(lambda ws: sum(ws) > 1e-6),
       u=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_systematic_copies_are_floor_or_ceil_of_n_w(weights: list[float], u: float) -> None:
    n = len(weights)
    ancestors = systematic_resample(weights, u)
    assert len(ancestors) == n and ancestors == sorted(ancestors)
    total = sum(weights)
    for k, w in enumerate(weights):
        copies = ancestors.count(k)
        expected = n * w / total
        assert math.floor(expected - 1e-9) <= copies <= math.ceil(expected + 1e-9)
        if w == 0.0:
            assert copies == 0


def test_systematic_resampling_is_unbiased() -> None:
    """Mean copies over many uniforms equal n W_k (statistical, fixed seed)."""
    rng = random.Random(7)
    weights = [0.05, 0.3, 0.0, 0.15, 0.33, 0.17]
    n, draws = len(weights), 20_000
    counts = [0] * n
    for _ in range(draws):
        for a in systematic_resample(weights, rng.random()):
            counts[a] += 1
    for k, w in enumerate(weights):
        mean = counts[k] / draws
        # Copies lie in {floor, ceil}: the variance is at most 1/4, so 5 standard errors
        # are 5 * 0.5 / sqrt(draws) = 0.018.
        assert abs(mean - n * w) < 0.018, (k, mean, n * w)


def test_bad_inputs_are_refused() -> None:
    for weights, u in (([1.0], 1.0), ([1.0], -0.1), ([0.0, 0.0], 0.5), ([1.0, -1.0], 0.5),
                       ([], 0.5), ([math.nan, 1.0], 0.5)):
        with pytest.raises(ValueError):
            systematic_resample(weights, u)
