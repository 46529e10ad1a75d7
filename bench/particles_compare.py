"""Particles against blockwise selection on the verifiable prompt set: pass rate and cost.

Each prompt runs with plain decoding, blockwise selection and particles (same n, lambda, block
size; seeds of their own, so no method reads another's KV from the prefix cache). Reported:
pass rate and share of constraints met (95 % intervals, and paired differences) beside the
computed tokens per request. ``python -m bench.particles_compare --config FILE --out DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.promptset import PromptItem, load_prompts
from common.config import load_config
from common.prompts import prompt_as_text
from engine.seeds import run_seed
from engine.types import SamplingSettings, SBoNParams, SBoNResult
from reward.verifiers import constraint_reward, pass_reward

METHODS = ("plain", "blockwise", "particles")


@dataclass(frozen=True)
class Row:
    """One request's outcome."""

    method: str
    prompt_id: str
    repeat: int
    seed: int
    passed: float
    fraction: float
    tokens_computed: int
    tokens_generated: int
    completion_tokens: int
    resamplings: int
    latency_s: float


def params_for(method: str, args: argparse.Namespace) -> SBoNParams:
    if method == "plain":
        return SBoNParams(n=1, lam=math.inf, score=False)
    return SBoNParams(n=args.n, lam=args.lam, block_size=args.block_size, reward=args.reward,
                      particles=method == "particles", ess_threshold=args.ess_threshold)


def row_of(method: str, item: PromptItem, repeat: int, seed: int, result: SBoNResult,
           latency: float) -> Row:
    text = prompt_as_text(item.prompt)
    return Row(method, item.id, repeat, seed, pass_reward(text, result.text),
               constraint_reward(text, result.text), result.tokens_computed,
               result.tokens_generated, result.completion_tokens,
               sum(1 for b in result.blocks if b.particles and b.particles.resampled), latency)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % normal interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def summary(rows: Sequence[Row]) -> list[dict[str, Any]]:
    out = []
    for method in METHODS:
        mine = [r for r in rows if r.method == method]
        if not mine:
            continue
        passed, fraction = interval([r.passed for r in mine]), interval([r.fraction for r in mine])
        tokens = interval([float(r.tokens_computed) for r in mine])
        out.append({"method": method, "requests": len(mine), "pass_rate": passed[0],
                    "pass_rate_ci95": passed[1], "fraction_met": fraction[0],
                    "fraction_met_ci95": fraction[1], "tokens_computed": tokens[0],
                    "tokens_computed_ci95": tokens[1],
                    "resamplings": statistics.fmean(r.resamplings for r in mine),
                    "latency_s": statistics.fmean(r.latency_s for r in mine)})
    return out


def paired(rows: Sequence[Row], metric: str, first: str = "particles",
           second: str = "blockwise") -> dict[str, float]:
    """Mean difference ``first - second`` of ``metric`` over the same (prompt, repeat)."""
    by_key: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r.prompt_id, r.repeat), {})[r.method] = float(getattr(r, metric))
    diffs = [v[first] - v[second] for v in by_key.values() if first in v and second in v]
    if not diffs:
        return {}
    mean, half = interval(diffs)
    return {"mean": mean, "ci95": half, "pairs": len(diffs)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | requests | pass rate | constraints met | computed tokens | "
             "resamplings | latency s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['requests']} | {r['pass_rate']:.3f} ± "
            f"{r['pass_rate_ci95']:.3f} | {r['fraction_met']:.3f} ± {r['fraction_met_ci95']:.3f}"
            f" | {r['tokens_computed']:.0f} ± {r['tokens_computed_ci95']:.0f} | "
            f"{r['resamplings']:.2f} | {r['latency_s']:.1f} |")
    return "\n".join(lines)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from engine.runtime import start_runtime

    config = load_config(args.config, args.set)
    items = load_prompts(args.prompts_file, args.prompts)
    runtime = await start_runtime(config)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(index: int, item: PromptItem, method: str, repeat: int) -> Row:
        seed = run_seed(args.seed + repeat, index, METHODS.index(method) + 1)
        sampling = SamplingSettings(temperature=args.temperature, max_tokens=args.max_tokens,
                                    seed=seed)
        async with gate:
            started = time.perf_counter()
            result = await runtime.sbon.run(item.prompt, params_for(method, args), sampling,
                                            f"pc-{method}-{index}-{repeat}")
            return row_of(method, item, repeat, seed, result, time.perf_counter() - started)

    try:
        # Methods alternate in order from prompt to prompt, so none always runs first.
        jobs = [one(i, item, method, repeat)
                for repeat in range(args.repeats) for i, item in enumerate(items)
                for method in (args.methods if i % 2 == 0 else args.methods[::-1])]
        rows = list(await asyncio.gather(*jobs))
    finally:
        await runtime.close()
    differences = {metric: paired(rows, metric)
                   for metric in ("passed", "fraction", "tokens_computed")}
    return {"settings": {k: v for k, v in vars(args).items() if k != "set"},
            "summary": summary(rows), "particles_minus_blockwise": differences,
            "rows": [asdict(r) for r in rows]}


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods are among {', '.join(METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="key.path=value")
    parser.add_argument("--prompts-file", default="verifiable")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="seeds per prompt and method")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--ess-threshold", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reward", default="checks")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help="comma-separated, of: " + ",".join(METHODS))
    parser.add_argument("--out", required=True, help="folder for results.json and table.txt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(measure(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = table(report["summary"])
    differences = [f"- {metric}: {d['mean']:+.3f} ± {d['ci95']:.3f} ({d['pairs']} pairs)"
                   for metric, d in report["particles_minus_blockwise"].items() if d]
    if differences:
        text += ("\n\nparticles - blockwise, paired by prompt and repeat (mean ± 95 % "
                 "half-width):\n" + "\n".join(differences))
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
