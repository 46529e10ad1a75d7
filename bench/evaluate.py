"""``sbon eval``: reward gained against distortion, on a prompt set, for a grid of settings.

Per prompt, one engine request draws a pool of base samples, and the reward scores them
once. Each (n, lambda) setting is then drawn many times from the pool: n candidates and one
more, independent, base sample (distinct pool members, so i.i.d. draws from the base model
up to the pool's finiteness), a soft best-of-n selection [SBoN] among the n, and a
comparison with the base sample for the win rate. Blockwise settings need real decoding and
run through the soft best-of-n loop. Distortion figures follow MATH.md section 3.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.promptset import PromptItem
from common.values import json_number
from engine.seeds import run_seed
from engine.selection import kl_bon_bound, kl_bon_estimate_from_logprob, select, win_rate_bound
from engine.types import SamplingSettings, SBoNParams

BON, SOFT, BLOCKWISE = "best-of-n", "soft best-of-n", "blockwise"


@dataclass(frozen=True)
class EvalSettings:
    """The grid and its sampling. The defaults take a few minutes on a 2-core CPU."""

    n_grid: tuple[int, ...] = (1, 2, 4, 8)  # hard best-of-n as n grows
    lam_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, math.inf)  # soft, at soft_n
    soft_n: int = 8
    block_sizes: tuple[int, ...] = (16,)  # blockwise, at soft_n and blockwise_lam
    blockwise_lam: float = 1.0
    pool: int = 16
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


async def build_pool(runtime: Any, item: PromptItem, index: int,
                     settings: EvalSettings) -> Pool:
    """One engine request for the pool, one reward call for all of it."""
    sampling = settings.sampling(index)
    ids = runtime.backend.encode_prompt(item.prompt)
    candidates = await runtime.backend.generate(ids, settings.pool, sampling,
                                                settings.max_tokens, f"eval-pool-{index}",
                                                sampling.seed)
    _, scorer = runtime.sbon.scorer_for(settings.reward)
    rewards = await scorer.score([item.prompt] * len(candidates), [c.text for c in candidates])
    return Pool([float(r) for r in rewards], [c.cumulative_logprob for c in candidates])


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
                   progress: Callable[[int], Any] | None = None) -> EvalReport:
    """Build the pools (a few prompts at a time), then draw every setting."""
    tick = progress or (lambda _: None)
    gate = asyncio.Semaphore(4)
    items = list(prompts)[: settings.prompts]

    async def pool_of(index: int) -> Pool:
        async with gate:
            pool = await build_pool(runtime, items[index], index, settings)
            tick(1)
            return pool

    pools = await asyncio.gather(*(pool_of(i) for i in range(len(items))))
    base_mean = statistics.fmean(r for p in pools for r in p.rewards)
    rng = random.Random(settings.seed)
    results = []
    for method, n, lam in settings.pool_settings():
        result = SettingResult(method, n, lam, None, base_mean=base_mean)
        result.per_prompt = [draw_from_pool(p, n, lam, settings.draws, rng) for p in pools]
        results.append(result)
    for size in settings.block_sizes:
        result = SettingResult(BLOCKWISE, settings.soft_n, settings.blockwise_lam, size,
                               base_mean=base_mean)

        async def block_of(index: int, size: int = size) -> list[Draw]:
            async with gate:
                draws = await blockwise_draw(runtime, items[index], index, pools[index], size,
                                             settings)
                tick(1)
                return draws

        result.per_prompt = list(await asyncio.gather(*(block_of(i) for i in range(len(items)))))
        results.append(result)
    return EvalReport(settings, results)


def markdown_table(report: EvalReport) -> str:
    """The reward-against-distortion table, one row per setting."""
    head = ("| method | n | lambda | B | reward | base | gain | win rate | KL(w‖u) | "
            "BoN bound | KL est. |")
    lines = [head, "|" + "---|" * 11]
    for row in report.rows():
        lam = row["lambda"] if isinstance(row["lambda"], str) else f"{row['lambda']:g}"
        lines.append(
            f"| {row['method']} | {row['n']} | {lam} | {row['block_size'] or '-'} | "
            f"{row['reward']:.3f} | {row['base_reward']:.3f} | {row['reward_gain']:+.3f} | "
            f"{row['win_rate']:.3f} ± {row['win_rate_se']:.3f} | {row['kl_from_uniform']:.3f} | "
            f"{row['kl_bon_bound']:.3f} | {row['kl_estimate']:.3f} |")
    return "\n".join(lines)
