"""Soft best-of-n selection and its distortion diagnostics, as pure functions.

Implements the selection rule of Verdun et al., "Soft Best-of-n Sampling for Model
Alignment" (arXiv 2505.03156) and the diagnostics of Beirami et al. (arXiv 2401.01879),
Gui et al. (arXiv 2406.00832) and Aminian et al. (arXiv 2507.05913). Nothing here knows
about engines, tokens or HTTP: inputs are rewards, outputs are numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from common.config import Normalization


@dataclass(frozen=True)
class Selection:
    """One soft best-of-n draw: the chosen index, the weights it was drawn from, diagnostics."""

    chosen_index: int
    weights: list[float]
    ess: float
    kl_from_uniform: float


def normalize_rewards(rewards: Sequence[float], mode: Normalization | str) -> list[float]:
    """Apply the configured normalisation to one request's rewards.

    ``zscore`` subtracts the mean and divides by the (population) standard deviation of the
    n candidates of this request; a constant reward vector maps to zeros.
    """
    mode = Normalization(mode)
    values = [float(r) for r in rewards]
    if mode is Normalization.RAW or not values:
        return values
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    std = math.sqrt(var)
    if std < 1e-12:
        return [0.0 for _ in values]
    return [(v - mean) / std for v in values]


def _check_rewards(rewards: Sequence[float]) -> None:
    if len(rewards) == 0:
        raise ValueError("at least one candidate is needed")
    if any(math.isnan(r) for r in rewards):
        raise ValueError("rewards must not be NaN")


def selection_weights(rewards: Sequence[float], lam: float) -> list[float]:
    """Selection probabilities softmax(r / lambda), computed in log space [SBoN eq. 1].

    ``lam == 0`` is hard best-of-n: uniform over the maximisers. ``lam == inf`` is a
    uniform pick, so the output is distributed as the base model.
    """
    _check_rewards(rewards)
    n = len(rewards)
    if lam < 0 or math.isnan(lam):
        raise ValueError("lambda must be >= 0")
    if math.isinf(lam):
        return [1.0 / n] * n
    top = max(rewards)
    if lam == 0:
        winners = [i for i, r in enumerate(rewards) if r == top]
        return [1.0 / len(winners) if i in winners else 0.0 for i in range(n)]
    # Subtract the max before exponentiating so that large r / lambda cannot overflow.
    exps = [math.exp((r - top) / lam) for r in rewards]
    total = sum(exps)
    return [e / total for e in exps]


def _gumbel(rng: random.Random) -> float:
    u = rng.random()
    while u <= 0.0:
        u = rng.random()
    return -math.log(-math.log(u))


def sample_index(weights: Sequence[float], rng: random.Random) -> int:
    """Draw an index from ``weights`` with the Gumbel-max trick.

    argmax_i (log w_i + G_i) with G_i ~ Gumbel(0, 1) is distributed as ``weights`` [SBoN,
    section 2]; zero weights can never win. A seeded ``rng`` makes the draw reproducible.
    """
    best_index, best_key = -1, -math.inf
    for i, w in enumerate(weights):
        if w <= 0.0:
            continue
        key = math.log(w) + _gumbel(rng)
        if key > best_key:
            best_index, best_key = i, key
    if best_index < 0:
        raise ValueError("weights must contain a positive entry")
    return best_index


def effective_sample_size(weights: Sequence[float]) -> float:
    """ESS = 1 / sum p_i^2: n for uniform weights, 1 for a one-hot choice."""
    return 1.0 / sum(w * w for w in weights)


def kl_from_uniform(weights: Sequence[float]) -> float:
    """log n - H(p): KL of the selection weights from uniform.

    Averaged over requests it upper-bounds KL(P_{n,lambda} || P) by data processing;
    per-block values add up over a response (chain rule) [MATH.md section 3].
    """
    n = len(weights)
    entropy = -sum(w * math.log(w) for w in weights if w > 0.0)
    return max(0.0, math.log(n) - entropy)


def kl_bon_bound(n: int) -> float:
    """Analytical bound KL(BoN_n || P) <= log n - (n-1)/n [KL, Theorem 1]."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


def kl_bon_estimate(n: int, eps: float) -> float:
    """The estimator D(eps) of Beirami et al. [KL] for hard best-of-n.

    ``eps`` is the base-model probability of the selected response. D is 0 for eps = 1
    and tends to the bound log n - (n-1)/n as eps -> 0.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if n == 1:
        return 0.0
    eps = min(max(eps, 0.0), 1.0)
    if eps <= 0.0:
        return kl_bon_bound(n)
    if eps >= 1.0:
        return 0.0
    # (1 - eps)^n and log(1 - eps) via log1p for accuracy when eps is tiny.
    log_one_minus = math.log1p(-eps)
    q = math.exp(n * log_one_minus)
    first = q * (math.log(n) + (n - 1) * log_one_minus - (n - 1) / n)
    second = (1.0 - q) * math.log((1.0 - q) / eps) if q < 1.0 else 0.0
    value = first + second
    return min(max(value, 0.0), kl_bon_bound(n))


def kl_bon_estimate_from_logprob(n: int, logprob: float | None) -> float:
    """D(eps) with eps = exp(logprob), the chosen sample's base log-probability [KL].

    Without a log-probability (None or NaN) the bound log n - (n-1)/n is returned, the value
    D tends to as eps -> 0.
    """
    if logprob is None or math.isnan(logprob):
        return kl_bon_bound(n)
    return kl_bon_estimate(n, math.exp(min(0.0, logprob)))


def win_rate_bound(n: int) -> float:
    """Best-of-n against one base sample wins at most n / (n + 1) of the time [BBN, KL]."""
    return n / (n + 1)


def kl_budget_lambda(n: int, kl_budget: float, reward_range: float) -> float:
    """Smallest lambda whose soft best-of-n KL stays within ``kl_budget`` [SM, Lemma 4.1].

    From KL <= log(n / (1 + (n-1) exp(-R/lambda))): lambda >= R / log((n-1) / (n e^-K - 1)).
    A budget of log n or more is met by any lambda (returns 0, hard best-of-n).
    """
    if n < 2 or kl_budget >= math.log(n):
        return 0.0
    if kl_budget <= 0.0:
        return math.inf
    denom = n * math.exp(-kl_budget) - 1.0
    return reward_range / math.log((n - 1) / denom)


def select(
    rewards: Sequence[float],
    lam: float,
    rng: random.Random,
    normalize: Normalization | str = Normalization.RAW,
) -> Selection:
    """Normalise, weight and draw one candidate; return the draw with its diagnostics."""
    values = normalize_rewards(rewards, normalize)
    weights = selection_weights(values, lam)
    index = sample_index(weights, rng)
    return Selection(
        chosen_index=index,
        weights=weights,
        ess=effective_sample_size(weights),
        kl_from_uniform=kl_from_uniform(weights),
    )
