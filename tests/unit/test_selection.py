"""Selection rule and diagnostics: exact values, limits and statistical frequency tests."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from engine.selection import (
    Normalization,
    effective_sample_size,
    kl_bon_bound,
    kl_bon_estimate,
    kl_bon_estimate_from_logprob,
    kl_from_uniform,
    normalize_rewards,
    sample_index,
    select,
    selection_weights,
    win_rate_bound,
)


def test_weights_are_softmax_of_rewards_over_lambda() -> None:
    rewards, lam = [1.0, 2.0, 0.5], 0.7
    expected = [math.exp(r / lam) for r in rewards]
    total = sum(expected)
    assert selection_weights(rewards, lam) == pytest.approx([e / total for e in expected])


def test_weights_survive_huge_rewards_in_log_space() -> None:
    weights = selection_weights([1e6, 1e6 - 1.0], 1e-3)
    assert weights[0] == pytest.approx(1.0) and weights[1] == pytest.approx(0.0)
    assert all(math.isfinite(w) for w in weights)


def test_lambda_zero_is_hard_best_of_n_with_uniform_ties() -> None:
    assert selection_weights([0.1, 3.0, 3.0, -1.0], 0.0) == [0.0, 0.5, 0.5, 0.0]


def test_lambda_infinity_is_uniform() -> None:
    assert selection_weights([5.0, -5.0, 0.0, 1.0], math.inf) == [0.25] * 4


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        selection_weights([], 1.0)
    with pytest.raises(ValueError):
        selection_weights([1.0], -0.5)
    with pytest.raises(ValueError):
        selection_weights([float("nan"), 1.0], 1.0)


def test_zscore_is_shift_and_scale_invariant() -> None:
    base = [0.3, 1.2, -0.4, 2.0]
    moved = [10 * r - 7 for r in base]
    assert normalize_rewards(base, Normalization.ZSCORE) == pytest.approx(
        normalize_rewards(moved, "zscore")
    )
    assert normalize_rewards([2.0, 2.0], "zscore") == [0.0, 0.0]
    assert normalize_rewards(base, "raw") == base


def test_diagnostics_at_the_extremes() -> None:
    uniform, onehot = [0.25] * 4, [0.0, 1.0, 0.0, 0.0]
    assert effective_sample_size(uniform) == pytest.approx(4.0)
    assert effective_sample_size(onehot) == pytest.approx(1.0)
    assert kl_from_uniform(uniform) == pytest.approx(0.0, abs=1e-12)
    assert kl_from_uniform(onehot) == pytest.approx(math.log(4))
    assert kl_bon_bound(1) == 0.0
    assert kl_bon_bound(8) == pytest.approx(math.log(8) - 7 / 8)
    assert win_rate_bound(8) == pytest.approx(8 / 9)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_estimator_is_between_zero_and_the_bound(n: int) -> None:
    values = [kl_bon_estimate(n, eps) for eps in (1.0, 0.9, 0.5, 0.1, 1e-3, 1e-9)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(0.0 <= v <= kl_bon_bound(n) + 1e-12 for v in values)
    # D(eps) grows as the chosen response becomes rarer and tends to the bound.
    assert values == sorted(values)
    assert values[-1] == pytest.approx(kl_bon_bound(n), rel=1e-6)


def test_kl_estimator_matches_the_formula() -> None:
    n, eps = 4, 0.2
    q = (1 - eps) ** n
    expected = q * (math.log(n) + (n - 1) * math.log(1 - eps) - (n - 1) / n) + (1 - q) * math.log(
        (1 - q) / eps
    )
    assert kl_bon_estimate(n, eps) == pytest.approx(expected)


def _frequencies(weights: list[float], draws: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    counts = [0] * len(weights)
    for _ in range(draws):
        counts[sample_index(weights, rng)] += 1
    return counts


@pytest.mark.parametrize("lam", [0.25, 1.0, 4.0])
def test_selection_frequencies_match_softmax_weights(lam: float) -> None:
    """Chi-square goodness of fit of 20,000 seeded draws against softmax(r / lambda)."""
    rewards = [0.0, 0.5, 1.0, -0.7, 0.2]
    weights = selection_weights(rewards, lam)
    draws = 20_000
    counts = _frequencies(weights, draws, seed=1234)
    result = stats.chisquare(counts, [w * draws for w in weights])
    assert result.pvalue > 1e-3, (counts, weights)


def test_hard_best_of_n_breaks_ties_uniformly() -> None:
    weights = selection_weights([1.0, 1.0, 0.0, 1.0], 0.0)
    counts = _frequencies(weights, 12_000, seed=7)
    assert counts[2] == 0
    result = stats.chisquare([counts[0], counts[1], counts[3]])
    assert result.pvalue > 1e-3, counts


def test_seeded_selection_is_reproducible() -> None:
    rewards = [0.1, 0.4, 0.3, 0.9]
    first = [select(rewards, 0.5, random.Random(99)).chosen_index for _ in range(5)]
    again = [select(rewards, 0.5, random.Random(99)).chosen_index for _ in range(5)]
    assert first == again
    draws = [select(rewards, 0.5, random.Random(s)).chosen_index for s in range(200)]
    assert len(set(draws)) > 1  # different seeds do explore


def test_select_reports_its_weights_and_diagnostics() -> None:
    selection = select([1.0, 0.0], 1.0, random.Random(0))
    assert sum(selection.weights) == pytest.approx(1.0)
    assert selection.ess == pytest.approx(effective_sample_size(selection.weights))
    assert 0.0 <= selection.kl_from_uniform <= math.log(2)


def test_the_estimator_from_a_log_probability() -> None:
    assert kl_bon_estimate_from_logprob(8, math.log(0.3)) == pytest.approx(kl_bon_estimate(8, 0.3))
    assert kl_bon_estimate_from_logprob(8, None) == kl_bon_bound(8)  # unknown eps: the bound
    assert kl_bon_estimate_from_logprob(8, math.nan) == kl_bon_bound(8)
    assert kl_bon_estimate_from_logprob(8, 0.5) == 0.0  # rounding above 0 means eps = 1
    assert kl_bon_estimate_from_logprob(1, -3.0) == 0.0
