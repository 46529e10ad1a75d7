"""``sbon eval``: reward gained against distortion, on a prompt set, for a grid of settings.

Per prompt, one engine request draws a pool of base samples, and the reward scores them
once. Each (n, lambda) setting is then drawn many times from the pool: n candidates and one
more, independent, base sample (distinct pool members, so i.i.d. draws from the base model
up to the pool's finiteness), a soft best-of-n selection (Verdun et al. 2025, arXiv
2505.03156) among the n, and a comparison with the base sample for the win rate. Blockwise
settings need real decoding and run through the soft best-of-n loop.

Every pool setting also gets the exact probability with which it selects each pool member
(closed form for hard best-of-n, enumeration or Monte Carlo over n-subsets for soft best-of-n)
and that distribution's KL from uniform over the pool: one estimate of KL to the base model,
the same kind of number for every method. The method is set out in docs/maths.md,
"Evaluation methodology"; the other distortion figures are those of docs/maths.md,
"Diagnostics".
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from bench.files import EvalCheckpoint
from bench.promptset import PromptItem
from common.values import json_number
from engine.seeds import run_seed
from engine.selection import kl_bon_bound, kl_bon_estimate_from_logprob, select, win_rate_bound
from engine.types import SamplingSettings, SBoNParams

BON, SOFT, BLOCKWISE = "best-of-n", "soft best-of-n", "blockwise"

# How a setting's pool selection probabilities were obtained (the "KL pool by" column).
CLOSED_FORM, ENUMERATION, MONTE_CARLO = "closed form", "enumeration", "Monte Carlo"
NO_POOL_KL = "n/a (real runs)"
# Soft best-of-n enumerates every n-subset of the pool up to this many, else samples as many
# (the Monte Carlo error on the pool KL is then of order 1e-3 nats for a pool of 32, n = 8).
POOL_SUBSETS = 200_000
_CHUNK = 20_000
SCORE_CHUNK = 16  # pool members per reward call


@dataclass(frozen=True)
class EvalSettings:
    """The grid and its sampling. The defaults take a few minutes on a 2-core CPU."""

    n_grid: tuple[int, ...] = (1, 2, 4, 8)  # hard best-of-n as n grows
    lam_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, math.inf)  # soft, at soft_n
    soft_n: int = 8
    block_sizes: tuple[int, ...] = (16,)  # blockwise, at soft_n and blockwise_lam
    blockwise_lam: float = 1.0
    pool: int = 32  # several times the largest n: see pool_kl_from_uniform
    draws: int = 200
    prompts: int = 16
    max_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    reward: str | None = None

    def sampling(self, prompt_index: int, stream: int = 0) -> SamplingSettings:
        """Seeds per prompt; ``stream`` k > 0 gives draws independent of the pool's.

        The engine seeds the k-th sample of a request seeded s with s + k, so a blockwise
        run seeded like the pool would start with the pool's own first blocks.
        """
        return SamplingSettings(temperature=self.temperature, max_tokens=self.max_tokens,
                                seed=run_seed(self.seed, prompt_index, stream))

    def check(self) -> None:
        """Refuse a grid the pool cannot serve: every draw needs n + 1 distinct samples."""
        needed = max(*self.n_grid, self.soft_n) + 1
        if self.pool < needed:
            raise ValueError(f"--pool must be at least {needed} (the largest n plus a base sample)")
        if self.draws < 1 or self.prompts < 1:
            raise ValueError("--draws and --prompts must be positive")

    def pool_settings(self) -> list[tuple[str, int, float]]:
        """(method, n, lambda) of every setting drawn from the pool."""
        hard = [(BON, n, 0.0) for n in self.n_grid]
        soft = [(SOFT, self.soft_n, lam) for lam in self.lam_grid]
        return hard + soft


@dataclass(frozen=True)
class Pool:
    """One prompt's base samples: rewards and cumulative log-probabilities."""

    rewards: list[float]
    logprobs: list[float | None]


@dataclass(frozen=True)
class Draw:
    """One selection and the base sample it is compared with."""

    reward: float
    base_reward: float
    kl_from_uniform: float
    kl_estimate: float
    kl_bound: float  # log n - (n-1)/n per selection, summed over blocks

    @property
    def win(self) -> float:
        # Ties count one half, so that identical rewards give a win rate of exactly 1/2.
        if self.reward == self.base_reward:
            return 0.5
        return 1.0 if self.reward > self.base_reward else 0.0


@dataclass
class SettingResult:
    """The figures of one setting over all prompts."""

    method: str
    n: int
    lam: float
    block_size: int | None
    per_prompt: list[list[Draw]] = field(default_factory=list)
    base_mean: float = math.nan  # mean reward of the base model over every pool sample
    pool_kl: list[float] = field(default_factory=list)  # per prompt; empty for blockwise
    pool_kl_method: str = NO_POOL_KL

    def _mean(self, attribute: str) -> float:
        return statistics.fmean(getattr(d, attribute) for draws in self.per_prompt
                                for d in draws)

    def win_rates(self) -> list[float]:
        return [statistics.fmean(d.win for d in draws) for draws in self.per_prompt]

    def figures(self) -> dict[str, Any]:
        rates = self.win_rates()
        spread = statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else 0.0
        return {
            "method": self.method, "n": self.n,
            "lambda": json_number(self.lam),
            "block_size": self.block_size,
            "reward": self._mean("reward"), "base_reward": self.base_mean,
            "reward_gain": self._mean("reward") - self.base_mean,
            "win_rate": statistics.fmean(rates), "win_rate_se": spread,
            "win_rate_bound": win_rate_bound(self.n),
            "kl_pool": statistics.fmean(self.pool_kl) if self.pool_kl else None,
            "kl_pool_method": self.pool_kl_method,
            "kl_from_uniform": self._mean("kl_from_uniform"),
            "kl_bon_bound": self._mean("kl_bound"),
            "kl_estimate": self._mean("kl_estimate"),
            "draws": sum(len(d) for d in self.per_prompt),
        }


def draw_from_pool(pool: Pool, n: int, lam: float, draws: int, rng: random.Random) -> list[Draw]:
    """``draws`` soft best-of-n selections of n pool members, each against one more member."""
    if len(pool.rewards) < n + 1:
        raise ValueError(f"a pool of {len(pool.rewards)} cannot give n = {n} plus a base sample")
    out = []
    for _ in range(draws):
        picked = rng.sample(range(len(pool.rewards)), n + 1)
        candidates, base = picked[:n], picked[n]
        selection = select([pool.rewards[i] for i in candidates], lam, rng)
        chosen = candidates[selection.chosen_index]
        out.append(Draw(pool.rewards[chosen], pool.rewards[base], selection.kl_from_uniform,
                        kl_bon_estimate_from_logprob(n, pool.logprobs[chosen]), kl_bon_bound(n)))
    return out


def _check_pool(rewards: Sequence[float], n: int) -> None:
    if not 1 <= n <= len(rewards):
        raise ValueError(f"a pool of {len(rewards)} cannot give n = {n} distinct members")
    if any(math.isnan(r) or r == math.inf for r in rewards):
        raise ValueError("rewards must not be NaN or +inf")
    if sum(1 for r in rewards if r == -math.inf) >= n:
        # Some n-subset would then hold only "never choose" members, which select() refuses.
        raise ValueError("the pool holds n or more rewards of -inf")


def hard_bon_pool_probabilities(rewards: Sequence[float], n: int) -> list[float]:
    """Exact probability that hard best-of-n of n distinct pool members picks each member.

    The n candidates are a uniform n-subset of the pool (drawn without replacement, as
    :func:`draw_from_pool` does), and ties at the top are split evenly (``select`` with
    lambda = 0). For member j, with L members strictly below its reward and T members tied
    with it (j included), the subset must hold j, t of the T - 1 others tied with it and
    n - 1 - t of the L below, and j then wins with probability 1 / (t + 1):

        P(j) = sum_t C(T-1, t) C(L, n-1-t) / (t + 1) / C(m, n).

    With distinct rewards and rank k (1 = lowest) this is C(k-1, n-1) / C(m, n).
    See docs/maths.md, "Evaluation methodology".
    """
    _check_pool(rewards, n)
    total = math.comb(len(rewards), n)
    below = {r: sum(1 for v in rewards if v < r) for r in set(rewards)}
    tied = {r: sum(1 for v in rewards if v == r) for r in set(rewards)}
    out = []
    for r in rewards:
        low, ties = below[r], tied[r]
        count = sum(Fraction(math.comb(ties - 1, t) * math.comb(low, n - 1 - t), t + 1)
                    for t in range(min(ties, n)))
        out.append(float(count / total))
    return out


def _subsets(m: int, n: int, max_subsets: int, seed: int | Sequence[int]
             ) -> tuple[Iterator[np.ndarray], int, str]:
    """Every n-subset of range(m) if there are at most ``max_subsets``, else that many drawn.

    Yields them in chunks (arrays of shape (k, n)); returns the chunks, their total count and
    a label saying which.
    """
    count = math.comb(m, n)
    if count <= max_subsets:
        every = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64)
        return iter([every]), count, f"{ENUMERATION} ({count} subsets)"
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)

    def drawn() -> Iterator[np.ndarray]:
        left = max_subsets
        while left > 0:
            k = min(left, _CHUNK)
            # The n smallest of m i.i.d. uniform keys index a uniform n-subset.
            yield np.argpartition(rng.random((k, m)), n - 1, axis=1)[:, :n]
            left -= k

    return drawn(), max_subsets, f"{MONTE_CARLO} ({max_subsets} subsets)"


def soft_bon_pool_probabilities(rewards: Sequence[float], n: int, lam: float,
                                max_subsets: int = POOL_SUBSETS,
                                seed: int | Sequence[int] = 0) -> tuple[list[float], str]:
    """Probability that soft best-of-n of n distinct pool members picks each member.

    P(j) = E_S[ 1{j in S} softmax_S(r / lambda)_j ] over uniform n-subsets S of the pool.
    Lambda = 0 is the closed form of :func:`hard_bon_pool_probabilities`, lambda = inf a
    uniform pick (with finite rewards). Otherwise the expectation is an exact average over
    every n-subset when there are at most ``max_subsets`` of them, else a Monte Carlo
    average over ``max_subsets`` seeded subsets (which sums to 1 exactly, each subset
    spreading its softmax weights over its members). Returns the probabilities and how they
    were obtained (:data:`CLOSED_FORM`, or :data:`ENUMERATION` or :data:`MONTE_CARLO` with
    the number of subsets).
    """
    _check_pool(rewards, n)
    if lam < 0 or math.isnan(lam):
        raise ValueError("lambda must be >= 0")
    m = len(rewards)
    if lam == 0:
        return hard_bon_pool_probabilities(rewards, n), CLOSED_FORM
    if math.isinf(lam) and all(r != -math.inf for r in rewards):
        return [1.0 / m] * m, CLOSED_FORM
    chunks, count, how = _subsets(m, n, max_subsets, seed)
    pool = np.asarray(rewards, dtype=np.float64)
    totals = np.zeros(m)
    for subsets in chunks:
        values = pool[subsets]
        if math.isinf(lam):
            weights = np.isfinite(values).astype(np.float64)
        else:
            weights = np.exp((values - values.max(axis=1, keepdims=True)) / lam)
        weights /= weights.sum(axis=1, keepdims=True)
        totals += np.bincount(subsets.ravel(), weights=weights.ravel(), minlength=m)
    return [float(v) for v in totals / count], how


def pool_kl_from_uniform(probabilities: Sequence[float]) -> float:
    """KL(p ‖ uniform over the pool) = log m - H(p), in [0, log m].

    The pool-based estimate of a setting's KL to the base model (docs/maths.md,
    "Evaluation methodology"): it can never exceed log m, so the pool must be several
    times the largest n for it to resolve best-of-n.
    """
    m = len(probabilities)
    entropy = -sum(p * math.log(p) for p in probabilities if p > 0.0)
    return min(max(0.0, math.log(m) - entropy), math.log(m))


def pool_kl(pool: Pool, n: int, lam: float, seed: int | Sequence[int] = 0,
            max_subsets: int = POOL_SUBSETS) -> tuple[float, str]:
    """One prompt's pool-based KL of the setting (n, lambda), and how it was obtained."""
    probabilities, how = soft_bon_pool_probabilities(pool.rewards, n, lam, max_subsets, seed)
    return pool_kl_from_uniform(probabilities), how


async def build_pool(runtime: Any, item: PromptItem, index: int,
                     settings: EvalSettings) -> Pool:
    """One engine request for the pool, then reward calls of ``SCORE_CHUNK`` members each.

    Each reward call is held to the reward's timeout, which is set for one request's n
    candidates, so a large pool is scored a chunk at a time.
    """
    sampling = settings.sampling(index)
    ids = runtime.backend.encode_prompt(item.prompt)
    candidates = await runtime.backend.generate(ids, settings.pool, sampling,
                                                settings.max_tokens, f"eval-pool-{index}",
                                                sampling.seed)
    _, scorer = runtime.sbon.scorer_for(settings.reward)
    rewards: list[float] = []
    for start in range(0, len(candidates), SCORE_CHUNK):
        chunk = candidates[start:start + SCORE_CHUNK]
        scores = await scorer.score([item.prompt] * len(chunk), [c.text for c in chunk])
        rewards.extend(float(r) for r in scores)
    return Pool(rewards, [c.cumulative_logprob for c in candidates])


async def blockwise_draw(runtime: Any, item: PromptItem, index: int, pool: Pool,
                         block_size: int, settings: EvalSettings) -> list[Draw]:
    """One real blockwise run, compared with every pool sample (a lower-variance win rate)."""
    params = SBoNParams(n=settings.soft_n, lam=settings.blockwise_lam, block_size=block_size,
                        reward=settings.reward)
    result = await runtime.sbon.run(item.prompt, params, settings.sampling(index, block_size),
                                    f"eval-block{block_size}-{index}")
    reward = result.final_block.chosen.reward
    d = result.diagnostics
    return [Draw(reward, base, d.kl_from_uniform, d.kl_estimate, d.kl_bon_bound)
            for base in pool.rewards]


@dataclass
class EvalReport:
    settings: EvalSettings
    results: list[SettingResult]

    def rows(self) -> list[dict[str, Any]]:
        return [r.figures() for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings["lam_grid"] = [json_number(v) for v in self.settings.lam_grid]
        return {"settings": settings, "results": self.rows()}


async def run_eval(runtime: Any, prompts: Sequence[PromptItem], settings: EvalSettings,
                   progress: Callable[[int], Any] | None = None,
                   checkpoint: EvalCheckpoint | None = None) -> EvalReport:
    """Build the pools (a few prompts at a time), then draw every setting.

    With a ``checkpoint`` (bench/files.py), each prompt's pool and blockwise runs are
    recorded as they finish, and those already recorded are not computed again.
    """
    tick = progress or (lambda _: None)
    gate = asyncio.Semaphore(4)
    items = list(prompts)[: settings.prompts]

    async def pool_of(index: int) -> Pool:
        saved = checkpoint.get("pool", index) if checkpoint else None
        if saved is not None:
            tick(1)
            return Pool(**saved)
        async with gate:
            pool = await build_pool(runtime, items[index], index, settings)
            if checkpoint:
                checkpoint.record("pool", index, pool)
            tick(1)
            return pool

    pools = await asyncio.gather(*(pool_of(i) for i in range(len(items))))
    base_mean = statistics.fmean(r for p in pools for r in p.rewards)
    rng = random.Random(settings.seed)
    results = []
    for method, n, lam in settings.pool_settings():
        result = SettingResult(method, n, lam, None, base_mean=base_mean)
        result.per_prompt = [draw_from_pool(p, n, lam, settings.draws, rng) for p in pools]
        # Common random subsets across lambdas (seeded per prompt) keep the soft curve smooth.
        kls = [pool_kl(p, n, lam, (settings.seed, i)) for i, p in enumerate(pools)]
        result.pool_kl = [k for k, _ in kls]
        result.pool_kl_method = ", ".join(sorted({how for _, how in kls}))
        results.append(result)
    for size in settings.block_sizes:
        result = SettingResult(BLOCKWISE, settings.soft_n, settings.blockwise_lam, size,
                               base_mean=base_mean)

        async def block_of(index: int, size: int = size) -> list[Draw]:
            saved = checkpoint.get(f"block{size}", index) if checkpoint else None
            if saved is not None:
                tick(1)
                return [Draw(**d) for d in saved]
            async with gate:
                draws = await blockwise_draw(runtime, items[index], index, pools[index], size,
                                             settings)
                if checkpoint:
                    checkpoint.record(f"block{size}", index, draws)
                tick(1)
                return draws

        result.per_prompt = list(await asyncio.gather(*(block_of(i) for i in range(len(items)))))
        results.append(result)
    return EvalReport(settings, results)


def markdown_table(report: EvalReport) -> str:
    """The reward-against-distortion table, one row per setting."""
    head = ("| method | n | lambda | B | reward | base | gain | win rate | KL pool | KL(w‖u) | "
            "BoN bound | KL est. | KL pool by |")
    lines = [head, "|" + "---|" * 13]
    for row in report.rows():
        lam = row["lambda"] if isinstance(row["lambda"], str) else f"{row['lambda']:g}"
        pool = "n/a" if row["kl_pool"] is None else f"{row['kl_pool']:.3f}"
        lines.append(
            f"| {row['method']} | {row['n']} | {lam} | {row['block_size'] or '-'} | "
            f"{row['reward']:.3f} | {row['base_reward']:.3f} | {row['reward_gain']:+.3f} | "
            f"{row['win_rate']:.3f} ± {row['win_rate_se']:.3f} | {pool} | "
            f"{row['kl_from_uniform']:.3f} | {row['kl_bon_bound']:.3f} | "
            f"{row['kl_estimate']:.3f} | {row['kl_pool_method']} |")
    return "\n".join(lines)
