"""Which candidates to stop early: the pure decision rules of ``sbon.prune``.

The online loop (engine/pruned.py) and the offline replay of ``sbon eval`` call the same
:class:`Pruner`, so a request takes exactly the decisions its replay measures. Rank pruning
follows Speculative Rejection (arXiv 2410.20290); bound pruning is exact: the selection
probability it moves (total variation) stays within ``epsilon`` (docs/maths.md, pruning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from common.prune import PruneSettings

# Float noise: a weight bound is inflated by this relative margin so that rounding can
# never make it smaller than the weight it bounds.
BOUND_MARGIN = 1e-9


def checkpoints(every: int, max_tokens: int) -> list[int]:
    """Token counts at which live candidates are scored: every, 2 every, ... below max_tokens
    (a candidate at max_tokens has finished; its full reward decides, not a partial one)."""
    return list(range(every, max_tokens, every))


def aligned_checkpoints(every: int, max_tokens: int, prompt_tokens: int,
                        block: int | None) -> list[int]:
    """The checkpoints moved to KV-block boundaries: each to the first length at or after it
    at which prompt + response fill whole blocks of ``block`` tokens, duplicates dropped.

    A reward query on such a prefix finds all of it in the prefix cache (vLLM caches whole
    blocks only), so a checkpoint costs the question alone, not a ragged tail of up to
    ``block - 1`` tokens per candidate (docs/maths.md, pruning). Without a block size, or
    when no boundary falls before ``max_tokens``, the nominal checkpoints are kept.
    """
    nominal = checkpoints(every, max_tokens)
    if not block:
        return nominal
    moved = sorted({c + (-(prompt_tokens + c)) % block for c in nominal})
    aligned = [c for c in moved if c < max_tokens]
    return aligned or nominal


def weight_upper_bound(index: int, upper: float, lower: Sequence[float], lam: float) -> float:
    """Largest selection weight candidate ``index`` can still get among all n candidates.

    softmax(r / lambda)_i grows with r_i and falls with every other r_j, so with
    r_i <= ``upper`` and r_j >= ``lower[j]``: w_i <= e^(U_i/l) / (e^(U_i/l) + sum_j e^(L_j/l))
    (docs/maths.md, pruning). lambda = 0 splits ties evenly: the weight is 0 exactly when
    U_i < max_j L_j. lambda = inf picks uniformly among the rewards above -inf.
    """
    others = [value for j, value in enumerate(lower) if j != index]
    if upper == -math.inf:
        return 0.0  # "never choose" (engine/guarded.py): weight 0 for every lambda
    if lam == 0:
        return 0.0 if others and upper < max(others) else 1.0
    if math.isinf(lam):
        return 1.0 / (1 + sum(1 for value in others if value > -math.inf))
    terms = [upper / lam] + [value / lam for value in others if value > -math.inf]
    top = max(terms)
    log_total = top + math.log(sum(math.exp(t - top) for t in terms))
    return min(1.0, math.exp(upper / lam - log_total) * (1 + BOUND_MARGIN))


def rank_prune(partial: Mapping[int, float], running: Set[int], keep: float,
               min_keep: int) -> list[int]:
    """Running candidates outside the top ``keep`` fraction of the live ones.

    ``partial`` holds the partial reward of every live candidate (a finished one's is its
    final reward). Finished candidates are never pruned: their cost is spent and their
    reward exact. Ties go to the lower index, so the decision is deterministic.
    """
    target = max(min_keep, math.ceil(keep * len(partial) - 1e-9))
    order = sorted(partial, key=lambda i: (-partial[i], i))
    kept = set(order[:target])
    return sorted(i for i in partial if i not in kept and i in running)


@dataclass(frozen=True)
class BoundDecision:
    """The candidates bound pruning stops at one checkpoint, and their weight bounds."""

    pruned: list[int]
    weight_bounds: dict[int, float]


def bound_prune(lower: Sequence[float], upper: Sequence[float], live: Set[int],
                running: Set[int], lam: float, budget: float, min_keep: int) -> BoundDecision:
    """Prune running candidates, smallest weight bound first, while the bounds fit ``budget``.

    ``lower``/``upper`` bound the final reward of every one of the n candidates (pruned ones
    keep the bounds they had when pruned; finished ones have lower = upper = their reward).
    Pruning a set whose weight bounds sum to <= epsilon moves <= epsilon of probability.
    """
    bounds = {i: weight_upper_bound(i, upper[i], lower, lam) for i in running}
    order = sorted(running, key=lambda i: (bounds[i], i))
    pruned: list[int] = []
    left = budget
    for i in order:
        if len(live) - len(pruned) <= min_keep or bounds[i] > left:
            break
        pruned.append(i)
        left -= bounds[i]
    return BoundDecision(sorted(pruned), {i: bounds[i] for i in pruned})


@dataclass
class Pruner:
    """The pruning state of one selection of n candidates, checkpoint after checkpoint."""

    settings: PruneSettings
    n: int
    lam: float
    pruned_at: list[int | None] = field(init=False)
    spent: float = 0.0  # bound mode: the sum of the pruned candidates' weight bounds
    lower: list[float] = field(init=False)
    upper: list[float] = field(init=False)
    scored_checkpoints: int = 0

    def __post_init__(self) -> None:
        self.pruned_at = [None] * self.n
        self.lower = [-math.inf] * self.n
        self.upper = [math.inf] * self.n

    @property
    def live(self) -> set[int]:
        """Candidates not pruned (running or finished)."""
        return {i for i in range(self.n) if self.pruned_at[i] is None}

    def can_prune(self, running: Set[int]) -> bool:
        """Whether a checkpoint could prune anything: some candidate runs and more than
        ``min_keep`` are live."""
        return bool(running) and len(self.live) > self.settings.min_keep

    def rank_step(self, checkpoint: int, partial: Mapping[int, float],
                  running: Set[int]) -> list[int]:
        """Record and return the candidates rank pruning stops at ``checkpoint``."""
        self.scored_checkpoints += 1
        pruned = rank_prune(partial, running, self.settings.keep, self.settings.min_keep)
        return self._mark(pruned, checkpoint)

    def bound_step(self, checkpoint: int, bounds: Mapping[int, tuple[float, float]],
                   exact: Mapping[int, float], running: Set[int]) -> list[int]:
        """Record and return the candidates bound pruning stops at ``checkpoint``.

        ``bounds`` (lower, upper) of the running candidates' partial responses, ``exact``
        the final rewards of the live candidates that have finished.
        """
        self.scored_checkpoints += 1
        for i, (low, high) in bounds.items():
            self.lower[i], self.upper[i] = low, high
        for i, reward in exact.items():
            self.lower[i] = self.upper[i] = reward
        decision = bound_prune(self.lower, self.upper, self.live, running, self.lam,
                               self.settings.epsilon - self.spent, self.settings.min_keep)
        self.spent += sum(decision.weight_bounds.values())
        return self._mark(decision.pruned, checkpoint)

    def _mark(self, pruned: list[int], checkpoint: int) -> list[int]:
        for i in pruned:
            self.pruned_at[i] = checkpoint
        return pruned


def pruned_mass(weights: Sequence[float], pruned_at: Sequence[int | None]) -> float:
    """Total variation between selection with and without pruning: the unpruned weight of
    the pruned candidates (docs/maths.md, pruning)."""
    return sum(w for w, at in zip(weights, pruned_at, strict=True) if at is not None)
