"""``sbon bench``: what soft best-of-n costs against plain generation and a naive design.

On the same prompts and at each concurrency level it times (a) plain sampling of n candidates
in one engine request with no scoring (the floor), (b) per-response soft best-of-n, (c)
blockwise soft best-of-n for each block size, and (d) the naive design: n separate
single-sample requests, then one reward call per candidate. Ratios are taken against (a)
measured in the same run. Targets: the engine in process, or a running server over HTTP.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from bench.promptset import PromptItem
from common.prune import PruneSettings
from common.values import json_number
from engine.seeds import run_seed
from engine.selection import select
from engine.types import SamplingSettings, SBoNParams

PLAIN, PER_RESPONSE, NAIVE = "plain", "per-response", "naive"
PRUNED = "pruned"  # per-response with sbon.prune (BenchSettings.prune)


def blockwise(size: int) -> str:
    return f"blockwise-{size}"


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. The defaults finish in a few minutes on a 2-core CPU."""

    n: int = 4
    lam: float = 1.0
    max_tokens: int = 64
    block_sizes: tuple[int, ...] = (16, 32)
    concurrency: tuple[int, ...] = (1, 2)
    prompts: int = 4
    seed: int = 0
    temperature: float = 1.0
    reward: str | None = None
    naive: bool = True
    prune: PruneSettings | None = None  # adds the pruned per-response method

    def methods(self) -> list[str]:
        pruned = [PRUNED] if self.prune is not None else []
        names = [PLAIN, PER_RESPONSE, *pruned, *(blockwise(b) for b in self.block_sizes)]
        return [*names, NAIVE] if self.naive else names

    def sampling(self, prompt_index: int, method: str) -> SamplingSettings:
        """Seeds of their own per prompt and method.

        The engine gives the k-th sample of a request seeded s the seed s + k, so methods
        sharing seeds would draw the same candidates, and a later method would find the
        earlier one's reward queries in the prefix cache: a measurement artefact.
        """
        stream = self.methods().index(method) + 1 if method in self.methods() else 0
        return SamplingSettings(temperature=self.temperature, max_tokens=self.max_tokens,
                                seed=run_seed(self.seed, prompt_index, stream))

    def params(self, method: str) -> SBoNParams:
        size = int(method.rsplit("-", 1)[1]) if method.startswith("blockwise-") else None
        return SBoNParams(n=self.n, lam=self.lam, block_size=size, reward=self.reward,
                          prune=self.prune if method == PRUNED else None)


@dataclass(frozen=True)
class Sample:
    """One request's cost."""

    latency_s: float
    generated_tokens: int  # across all candidates
    returned_tokens: int  # what the client receives
    generation_s: float = 0.0
    scoring_s: float = 0.0
    selection_s: float = 0.0
    # Prompt tokens of the request's engine requests: computed, or from the prefix cache.
    generation_computed: int = 0
    generation_cached: int = 0
    scoring_computed: int = 0
    scoring_cached: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class MethodRun:
    """All requests of one method at one concurrency level."""

    method: str
    concurrency: int
    wall_s: float
    samples: list[Sample]

    @property
    def generated_tokens_per_s(self) -> float:
        return sum(s.generated_tokens for s in self.samples) / self.wall_s

    @property
    def returned_tokens_per_s(self) -> float:
        return sum(s.returned_tokens for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def latency(self, q: float) -> float:
        return percentile([s.latency_s for s in self.samples], q)

    def phase_s(self) -> dict[str, float]:
        """Mean seconds per request in each phase."""
        return {phase: statistics.fmean(getattr(s, f"{phase}_s") for s in self.samples)
                for phase in ("generation", "scoring", "selection")}

    @property
    def computed_tokens(self) -> float:
        """Mean tokens computed per request: decoded by every candidate, plus prompt tokens
        computed (not cached) in generation and scoring (``tokens_computed``)."""
        return statistics.fmean(s.generated_tokens + s.generation_computed + s.scoring_computed
                                for s in self.samples)

    def prefill(self) -> dict[str, float]:
        """Mean prompt tokens per request, computed and cached, in generation and scoring."""
        keys = ("generation_computed", "generation_cached", "scoring_computed",
                "scoring_cached")
        return {key: statistics.fmean(getattr(s, key) for s in self.samples) for key in keys}

    @property
    def scoring_share(self) -> float:
        """Share of the requests' time spent in reward scoring."""
        total = sum(s.latency_s for s in self.samples)
        return sum(s.scoring_s for s in self.samples) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "concurrency": self.concurrency, "requests": len(self.samples),
            "wall_s": self.wall_s,
            "generated_tokens": sum(s.generated_tokens for s in self.samples),
            "returned_tokens": sum(s.returned_tokens for s in self.samples),
            "generated_tokens_per_s": self.generated_tokens_per_s,
            "returned_tokens_per_s": self.returned_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "latency_p50_s": self.latency(50), "latency_p95_s": self.latency(95),
            "phase_mean_s": self.phase_s(), "scoring_share": self.scoring_share,
            "prefill_mean_tokens": self.prefill(),
            "computed_tokens_mean": self.computed_tokens,
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class BenchReport:
    """Every run, with ratios against plain sampling at the same concurrency."""

    settings: BenchSettings
    target: str
    runs: list[MethodRun] = field(default_factory=list)

    def baseline(self, concurrency: int) -> MethodRun | None:
        return next((r for r in self.runs if r.method == PLAIN and r.concurrency == concurrency),
                    None)

    def ratios(self) -> list[dict[str, Any]]:
        """Each method against (a) plain: throughput and latency quotients."""
        out = []
        for run in self.runs:
            base = self.baseline(run.concurrency)
            if base is None or run.method == PLAIN:
                continue
            out.append({
                "method": run.method, "concurrency": run.concurrency,
                "generated_tokens_per_s": run.generated_tokens_per_s
                / base.generated_tokens_per_s,
                "returned_tokens_per_s": run.returned_tokens_per_s
                / base.returned_tokens_per_s,
                "requests_per_s": run.requests_per_s / base.requests_per_s,
                "latency_p50": run.latency(50) / base.latency(50),
                "latency_p95": run.latency(95) / base.latency(95),
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings["lam"] = json_number(self.settings.lam)
        if self.settings.prune is not None:
            settings["prune"] = self.settings.prune.model_dump()
        return {"settings": settings, "target": self.target,
                "runs": [r.to_dict() for r in self.runs], "ratios": self.ratios()}


RequestFn = Callable[[int, str], Awaitable[Sample]]


class BenchTarget(Protocol):
    """Where the methods run: the engine in process, or a server over HTTP."""

    name: str
    prompts: list[PromptItem]

    def supports(self, method: str) -> bool:
        """Whether this target can measure ``method``."""
        ...

    def request_fn(self, method: str) -> RequestFn:
        """The coroutine that sends one request of ``method`` for prompt ``index``."""
        ...


async def run_method(request: RequestFn, prompt_count: int, concurrency: int,
                     method: str, on_done: Callable[[], None]) -> MethodRun:
    """Every prompt once, with at most ``concurrency`` requests in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Sample:
        async with gate:
            sample = await request(index, f"bench-{method}-c{concurrency}-{index}")
            on_done()
            return sample

    started = time.perf_counter()
    samples = await asyncio.gather(*(one(i) for i in range(prompt_count)))
    return MethodRun(method, concurrency, time.perf_counter() - started, list(samples))


class InProcessTarget:
    """The methods over a started runtime (``engine.runtime.Runtime``)."""

    def __init__(self, runtime: Any, prompts: list[PromptItem], settings: BenchSettings) -> None:
        self.runtime, self.prompts, self.settings = runtime, prompts, settings
        self.prompt_ids = [runtime.backend.encode_prompt(p.prompt) for p in prompts]
        self.name = "in-process"

    async def reset_prefix_cache(self) -> None:
        for part in (self.runtime.backend, *getattr(self.runtime, "scorers", {}).values()):
            reset = getattr(part, "reset_prefix_cache", None)
            if reset is not None:
                await reset()

    def supports(self, method: str) -> bool:
        return True

    def request_fn(self, method: str) -> RequestFn:
        if method == PLAIN:
            return self._plain
        if method == NAIVE:
            return self._naive
        return lambda index, rid: self._sbon(method, index, rid)

    async def _plain(self, index: int, request_id: str) -> Sample:
        sampling = self.settings.sampling(index, PLAIN)
        started = time.perf_counter()
        backend = self.runtime.backend
        # The floor is vLLM's own n-sampling: one engine request with n samples.
        generate = getattr(backend, "generate_n_request", backend.generate)
        candidates = await generate(self.prompt_ids[index], self.settings.n, sampling,
                                    self.settings.max_tokens, request_id, sampling.seed)
        elapsed = time.perf_counter() - started
        tokens = sum(c.num_tokens for c in candidates)
        computed = sum(c.prefill.computed for c in candidates)
        cached = sum(c.prefill.cached for c in candidates)
        return Sample(elapsed, tokens, tokens, generation_s=elapsed,
                      generation_computed=computed, generation_cached=cached)

    async def _sbon(self, method: str, index: int, request_id: str) -> Sample:
        started = time.perf_counter()
        result = await self.runtime.sbon.run(
            self.prompts[index].prompt, self.settings.params(method),
            self.settings.sampling(index, method), request_id, self.prompt_ids[index])
        return Sample(time.perf_counter() - started, result.tokens_generated,
                      result.completion_tokens, result.timings["generation"],
                      result.timings["scoring"], result.timings["selection"],
                      result.prefill_generation.computed, result.prefill_generation.cached,
                      result.prefill_scoring.computed, result.prefill_scoring.cached)

    async def _naive(self, index: int, request_id: str) -> Sample:
        """n single-sample requests, then one reward call per candidate, in turn."""
        settings, prompt = self.settings, self.prompts[index].prompt
        sampling = settings.sampling(index, NAIVE)
        seed = sampling.seed or 0
        started = time.perf_counter()
        singles = await asyncio.gather(*(
            self.runtime.backend.generate(self.prompt_ids[index], 1, sampling,
                                          settings.max_tokens, f"{request_id}-{i}", seed + i)
            for i in range(settings.n)))
        generated = time.perf_counter()
        _, scorer = self.runtime.sbon.scorer_for(settings.reward)
        rewards = [(await scorer.score([prompt], [c.text]))[0] for (c,) in singles]
        scored = time.perf_counter()
        chosen = select(rewards, settings.lam, random.Random(seed)).chosen_index
        done = time.perf_counter()
        return Sample(done - started, sum(c.num_tokens for (c,) in singles),
                      singles[chosen][0].num_tokens, generated - started, scored - generated,
                      done - scored)


async def run_bench(target: BenchTarget, settings: BenchSettings,
                    progress: Callable[[int], Any] | None = None) -> BenchReport:
    """Warm every method up once, then time each method at each concurrency level.

    The levels are the outer loop, so every method of one level runs on the same prompts
    within minutes of the others (thermal and cache state alike).
    """
    report = BenchReport(settings, target.name)
    methods = [m for m in settings.methods() if target.supports(m)]
    tick = progress or (lambda _: None)
    # The first request of a new shape is slow: keep it out (on a prompt outside the timed set
    # when there is one, so that the timed requests find nothing of it in the prefix cache).
    count = min(settings.prompts, len(target.prompts))
    warm_index = count if len(target.prompts) > count else 0
    for method in methods:
        await target.request_fn(method)(warm_index, f"warm-{method}")
        tick(1)
    for concurrency in settings.concurrency:
        for method in methods:
            await _reset_prefix_cache(target)
            report.runs.append(await run_method(target.request_fn(method), count, concurrency,
                                                method, lambda: tick(1)))
    return report


async def _reset_prefix_cache(target: Any) -> None:
    """Start each method with an empty prefix cache, so no method reuses another's work."""
    reset = getattr(target, "reset_prefix_cache", None)
    if reset is not None:
        await reset()


def render_table(report: BenchReport) -> str:
    """The terminal table: one row per method and concurrency, ratios against plain.

    ``gen tok/s`` counts every candidate's tokens (the engine's work), ``out tok/s`` the
    tokens a client receives; ``x`` columns are quotients against plain at the same level.
    """
    ratio = {(r["method"], r["concurrency"]): r for r in report.ratios()}
    lines = [f"{'method':<14}{'conc':>5}{'gen tok/s':>10}{'out tok/s':>10}{'req/s':>7}"
             f"{'p50 s':>7}{'p95 s':>7}{'gen s':>7}{'score s':>8}{'sel ms':>7}{'score%':>7}"
             f"{'x tok/s':>8}{'x req/s':>8}{'gen pf/ca':>12}{'score pf/ca':>13}"
             f"{'computed':>9}"]
    for run in report.runs:
        phases = run.phase_s()
        r = ratio.get((run.method, run.concurrency))
        tok = f"{r['generated_tokens_per_s']:.2f}" if r else "1.00"
        req = f"{r['requests_per_s']:.2f}" if r else "1.00"
        lines.append(
            f"{run.method:<14}{run.concurrency:>5}{run.generated_tokens_per_s:>10.1f}"
            f"{run.returned_tokens_per_s:>10.1f}{run.requests_per_s:>7.3f}"
            f"{run.latency(50):>7.2f}{run.latency(95):>7.2f}{phases['generation']:>7.2f}"
            f"{phases['scoring']:>8.2f}{phases['selection'] * 1000:>7.2f}"
            f"{run.scoring_share * 100:>6.1f}%{tok:>8}{req:>8}"
            f"{_pair(run, 'generation'):>12}{_pair(run, 'scoring'):>13}"
            f"{run.computed_tokens:>9.0f}")
    lines.append("gen/score pf/ca: prompt tokens per request prefilled (computed) / served "
                 "from the prefix cache, in generation and in reward scoring; computed: "
                 "tokens decoded plus prompt tokens computed, per request")
    return "\n".join(lines)


def _pair(run: MethodRun, stage: str) -> str:
    prefill = run.prefill()
    return f"{prefill[f'{stage}_computed']:.0f}/{prefill[f'{stage}_cached']:.0f}"
