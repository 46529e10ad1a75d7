"""Soft best-of-n selection and its distortion diagnostics, as pure functions.

Implements the selection rule of Verdun et al. 2025, "Soft Best-of-n Sampling for Model
Alignment" (arXiv 2505.03156) and the diagnostics of Beirami et al. 2024 (arXiv 2401.01879),
Gui et al. 2024 (arXiv 2406.00832) and Aminian et al. 2025 (arXiv 2507.05913); docs/maths.md
derives each formula. Nothing here knows about engines, tokens or HTTP: inputs are rewards,
outputs are numbers.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
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
    lam: float = math.nan  # the lambda the weights were drawn with


def normalize_rewards(rewards: Sequence[float], mode: Normalization | str) -> list[float]:
    """Apply the configured normalisation to one request's rewards.

    ``zscore`` subtracts the mean and divides by the (population) standard deviation of the
    n candidates of this request; a constant reward vector maps to zeros. See docs/maths.md,
    "Reward normalisation". Rewards of -inf ("never choose", engine/guarded.py) stay -inf
    and are left out of the statistics.
    """
    mode = Normalization(mode)
    values = [float(r) for r in rewards]
    finite = [v for v in values if v != -math.inf]
    if mode is Normalization.RAW or not finite:
        return values
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / len(finite)
    std = math.sqrt(var)
    if std < 1e-12:
        return [v if v == -math.inf else 0.0 for v in values]
    return [v if v == -math.inf else (v - mean) / std for v in values]


def _check_rewards(rewards: Sequence[float]) -> None:
    if len(rewards) == 0:
        raise ValueError("at least one candidate is needed")
    if any(math.isnan(r) or r == math.inf for r in rewards):
        raise ValueError("rewards must not be NaN or +inf")
    if all(r == -math.inf for r in rewards):
        raise ValueError("at least one reward must be above -inf")


def selection_weights(rewards: Sequence[float], lam: float) -> list[float]:
    """Selection probabilities softmax(r / lambda), computed in log space.

    ``lam == 0`` is hard best-of-n: uniform over the maximisers. ``lam == inf`` is a
    uniform pick, so the output is distributed as the base model. Verdun et al. 2025
    (arXiv 2505.03156); docs/maths.md, "The selection rule". A reward of -inf means "never
    choose": its weight is 0 for every lambda (the uniform pick is over the others).
    """
    _check_rewards(rewards)
    n = len(rewards)
    if lam < 0 or math.isnan(lam):
        raise ValueError("lambda must be >= 0")
    if math.isinf(lam):
        allowed = sum(1 for r in rewards if r != -math.inf)
        return [0.0 if r == -math.inf else 1.0 / allowed for r in rewards]
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

    argmax_i (log w_i + G_i) with G_i ~ Gumbel(0, 1) is distributed as ``weights``
    (docs/maths.md, "The Gumbel-max draw"); zero weights can never win. A seeded ``rng``
    makes the draw reproducible.
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
    """ESS = 1 / sum p_i^2: n for uniform weights, 1 for a one-hot choice.

    See docs/maths.md, "Effective sample size".
    """
    return 1.0 / sum(w * w for w in weights)


def kl_from_uniform(weights: Sequence[float]) -> float:
    """log n - H(p): KL of the selection weights from uniform.

    Averaged over requests it upper-bounds KL(P_{n,lambda} || P) by data processing;
    per-block values add up over a response (chain rule). See docs/maths.md, "KL of the
    weights from uniform" and "Blockwise mode".
    """
    n = len(weights)
    entropy = -sum(w * math.log(w) for w in weights if w > 0.0)
    return max(0.0, math.log(n) - entropy)


def kl_bon_bound(n: int) -> float:
    """Analytical bound KL(BoN_n || P) <= log n - (n-1)/n.

    Beirami et al. 2024 (arXiv 2401.01879) show it is an upper bound, not an equality; see
    docs/maths.md, "The best-of-n KL bound".
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


def kl_bon_estimate(n: int, eps: float) -> float:
    """The estimator D(eps) of Beirami et al. 2024 (arXiv 2401.01879) for hard best-of-n.

    ``eps`` is the base-model probability of the selected response. D is 0 for eps = 1
    and tends to the bound log n - (n-1)/n as eps -> 0 (docs/maths.md, "The KL estimator").
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
    """D(eps) with eps = exp(logprob), the chosen sample's base log-probability.

    Without a log-probability (None or NaN) the bound log n - (n-1)/n is returned, the value
    D tends to as eps -> 0. See docs/maths.md, "The KL estimator".
    """
    if logprob is None or math.isnan(logprob):
        return kl_bon_bound(n)
    return kl_bon_estimate(n, math.exp(min(0.0, logprob)))


def win_rate_bound(n: int) -> float:
    """Best-of-n against one base sample wins at most n / (n + 1) of the time.

    Beirami et al. 2024 (arXiv 2401.01879); Gui et al. 2024 (arXiv 2406.00832); see
    docs/maths.md, "The win-rate bound".
    """
    return n / (n + 1)


KL_BUDGET_ITERATIONS = 200


def lambda_for_kl_budget(rewards: Sequence[float], kl_budget: float) -> float:
    """The smallest lambda whose weights softmax(r / lambda) have KL from uniform within
    ``kl_budget`` nats (docs/maths.md, "The KL budget").

    KL(weights || uniform) falls monotonically as lambda grows, from its hard best-of-n
    value (log n minus the log of the number of maximisers) at lambda = 0 to its value at
    lambda = inf (0, or log(n / allowed) when some rewards are -inf). So: a budget at or
    above the hard best-of-n value gives 0 (hard best-of-n; in particular any budget >=
    log n), a budget the uniform pick cannot meet gives inf, and otherwise bisection in
    log lambda finds lambda to a relative precision of about 1e-12, on the side that keeps
    the KL within the budget.
    """
    if kl_budget < 0 or math.isnan(kl_budget):
        raise ValueError("kl_budget must be >= 0")
    _check_rewards(rewards)
    slack = 1e-12  # float noise in log n - H(p)
    if kl_from_uniform(selection_weights(rewards, 0.0)) <= kl_budget + slack:
        return 0.0
    if kl_from_uniform(selection_weights(rewards, math.inf)) >= kl_budget - slack:
        return math.inf
    # The weights are one-hot well below the smallest gap between distinct rewards and
    # uniform well above their spread: the answer lies between.
    distinct = sorted({r for r in rewards if math.isfinite(r)})
    gap = min(b - a for a, b in itertools.pairwise(distinct))
    spread = distinct[-1] - distinct[0]
    low, high = math.log(max(gap * 1e-3, sys.float_info.min)), math.log(spread * 1e9)
    if kl_from_uniform(selection_weights(rewards, math.exp(high))) > kl_budget:
        return math.inf  # below what any finite lambda in range can resolve
    for _ in range(KL_BUDGET_ITERATIONS):
        middle = (low + high) / 2
        if kl_from_uniform(selection_weights(rewards, math.exp(middle))) <= kl_budget:
            high = middle
        else:
            low = middle
        if high - low < 1e-12:
            break
    return math.exp(high)


def select(
    rewards: Sequence[float],
    lam: float,
    rng: random.Random,
    normalize: Normalization | str = Normalization.RAW,
    kl_budget: float | None = None,
) -> Selection:
    """Normalise, weight and draw one candidate; return the draw with its diagnostics.

    With ``kl_budget`` (nats), lambda is solved per selection by :func:`lambda_for_kl_budget`
    on the normalised rewards and ``lam`` is ignored; the lambda used is reported.
    """
    values = normalize_rewards(rewards, normalize)
    if kl_budget is not None:
        lam = lambda_for_kl_budget(values, kl_budget)
    weights = selection_weights(values, lam)
    index = sample_index(weights, rng)
    return Selection(
        chosen_index=index,
        weights=weights,
        ess=effective_sample_size(weights),
        kl_from_uniform=kl_from_uniform(weights),
        lam=lam,
    )
