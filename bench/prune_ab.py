"""Pruned against unpruned per-response throughput, interleaved, through a running server.

``sbon bench`` times its methods one after the other; on a shared machine the load can change
between them. Here the two alternate round by round on the same prompts, and the ratio is
taken per round, so a load change moves both sides of a ratio alike:
``python -m bench.prune_ab --url URL --rounds 5 --n 8 --max-tokens 64 --prune-keep 0.5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.bench import PER_RESPONSE, PRUNED, BenchSettings, MethodRun, run_method
from bench.promptset import load_prompts
from common.prune import PruneSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prune_ab", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 101),
                        metavar="1..100")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prune-every", type=int, default=16)
    parser.add_argument("--prune-keep", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def round_figures(unpruned: MethodRun, pruned: MethodRun) -> dict[str, float]:
    """One round's requests/s of each side, their ratio and mean computed tokens."""
    def computed(run: MethodRun) -> float:
        return statistics.fmean(s.generated_tokens + s.generation_computed + s.scoring_computed
                                for s in run.samples)

    return {"per_response_rps": unpruned.requests_per_s, "pruned_rps": pruned.requests_per_s,
            "ratio": pruned.requests_per_s / unpruned.requests_per_s,
            "per_response_computed": computed(unpruned), "pruned_computed": computed(pruned)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm both methods, then alternate them ``rounds`` times (which goes first alternates)."""
    import httpx

    from bench.http import HTTPTarget

    settings = BenchSettings(n=args.n, max_tokens=args.max_tokens, block_sizes=(),
                             concurrency=(args.concurrency,), prompts=args.prompts, naive=False,
                             prune=PruneSettings(mode="rank", every=args.prune_every,
                                                 keep=args.prune_keep))
    prompts = load_prompts(None, args.prompts + 1)
    rounds = []
    async with httpx.AsyncClient(timeout=3600) as client:
        target = await HTTPTarget.connect(args.url, prompts, settings, client)
        for method in (PER_RESPONSE, PRUNED):
            await target.request_fn(method)(args.prompts, f"warm-{method}")
        for index in range(args.rounds):
            # Seeds of its own per round: a round must not find the last one's candidates
            # (same seeds, same tokens) in the prefix cache.
            target.settings = replace(settings, seed=index + 1)
            order = (PER_RESPONSE, PRUNED) if index % 2 == 0 else (PRUNED, PER_RESPONSE)
            runs = {m: await run_method(target.request_fn(m), args.prompts, args.concurrency,
                                        m, lambda: None) for m in order}
            rounds.append(round_figures(runs[PER_RESPONSE], runs[PRUNED]))
            print(json.dumps(rounds[-1]), flush=True)
    ratios = [r["ratio"] for r in rounds]
    return {"settings": vars(args) | {"out": str(args.out)}, "rounds": rounds,
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(measure(args))
    print(f"pruned / per-response req/s: median {result['median_ratio']:.2f}x "
          f"(min {result['min_ratio']:.2f}, max {result['max_ratio']:.2f}, "
          f"{len(result['rounds'])} rounds)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
