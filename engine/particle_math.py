"""The arithmetic of particles, as pure functions: weight updates, ESS, systematic resampling.

Particle k carries the sum of its reward increments since the last resampling,
A_k = r_t(k) - r_s(k); its weight is exp(A_k / lambda), which telescopes to exp(r(y)/lambda)
at the end (twisted SMC, arXiv 2404.17546; particle filtering for inference-time scaling,
arXiv 2502.01618; docs/maths.md, "Particles"). Inputs are rewards, outputs are numbers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from engine.selection import selection_weights


def add_increment(accumulated: float, previous: float, current: float) -> float:
    """A_k after a block: A_k + (r_t - r_{t-1}); a reward of -inf ("never choose") zeroes
    the particle's weight until the next resampling, which cannot pick it again."""
    if accumulated == -math.inf or current == -math.inf:
        return -math.inf
    return accumulated + (current - previous)


def particle_weights(accumulated: Sequence[float], lam: float) -> list[float]:
    """Normalised weights exp(A_k / lambda): softmax in log space, so lambda = 0 is uniform
    over the particles with the largest A_k and lambda = inf uniform over all (but -inf)."""
    return selection_weights(accumulated, lam)


def ess(weights: Sequence[float]) -> float:
    """Effective sample size (sum W)^2 / sum W^2 of unnormalised weights: n when equal, 1 when
    one particle holds all the weight."""
    total = math.fsum(weights)
    squares = math.fsum(w * w for w in weights)
    if squares <= 0.0:
        raise ValueError("at least one weight must be positive")
    return total * total / squares


def needs_resampling(weights: Sequence[float], threshold: float) -> bool:
    """Resample only when ESS < threshold * n (resampling adds variance of its own)."""
    return ess(weights) < threshold * len(weights)


def systematic_resample(weights: Sequence[float], u: float) -> list[int]:
    """Ancestor index of each of n new particles, drawn with one uniform ``u`` in [0, 1).

    The points (u + i) / n fall into the cumulative weights: particle k is copied
    floor(n W_k) or ceil(n W_k) times and n W_k times in expectation (unbiased), with less
    variance than multinomial draws. A weight of 0 is never an ancestor. Ancestors come out
    sorted, so the copies of one particle are neighbours.
    """
    n = len(weights)
    if not 0.0 <= u < 1.0:
        raise ValueError("u must be in [0, 1)")
    total = math.fsum(weights)
    if n == 0 or total <= 0.0 or any(w < 0.0 or math.isnan(w) for w in weights):
        raise ValueError("weights must be non-negative with a positive sum")
    cumulative: list[float] = []
    running = 0.0
    for w in weights:
        running += w / total
        cumulative.append(running)
    last = max(i for i, w in enumerate(weights) if w > 0.0)
    ancestors = []
    for i in range(n):
        point = (u + i) / n
        # The first k with cumulative[k] > point; rounding can only push past the end.
        ancestors.append(min(bisect.bisect_right(cumulative, point), last))
    return ancestors
