"""The ``--prune-*`` options of ``sbon eval``: measure one pruning rule (bench/prune_eval.py)
instead of the n and lambda grid; writes prune.json, prune.md and reward_vs_tokens.png."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.files import atomic_path, write_atomic


def add_prune_eval_args(parser: argparse.ArgumentParser) -> None:
    group = add_prune_args(
        parser, "with --prune-mode: replay one pruning rule on unpruned requests (exact "
        "distortion, tokens saved, rank correlation) at n = --soft-n, lambda = --prune-lam")
    group.add_argument("--prune-lam", type=float, default=1.0, help="selection lambda (1.0)")
    group.add_argument("--pass-reward", type=float,
                       help="also report the pass rate: the chance the selection's reward is "
                            "at least this (1 for the verifiers' fraction of checks met)")
    group.add_argument("--also", metavar="METHODS",
                       help="also run these on every prompt and put them on the chart: "
                            "blockwise, particles (comma-separated)")
    group.add_argument("--also-block-size", type=int, default=16,
                       help="block size of --also methods (16)")


def add_prune_args(parser: argparse.ArgumentParser, description: str) -> Any:
    """The options of one pruning rule (common/prune.py), as an argument group."""
    group = parser.add_argument_group("pruning", description)
    group.add_argument("--prune-mode", choices=("rank", "bound"))
    group.add_argument("--prune-every", type=int, help="tokens between checkpoints (16)")
    group.add_argument("--prune-keep", type=float, help="rank: fraction kept per checkpoint")
    group.add_argument("--prune-epsilon", type=float, help="bound: distortion budget")
    group.add_argument("--prune-min-keep", type=int, help="never fewer candidates than this")
    return group


def prune_settings(args: argparse.Namespace) -> Any:
    """The validated rule (a ValueError names a bad option); None without --prune-mode."""
    from common.prune import PruneSettings

    if not args.prune_mode:
        return None

    values = {"every": args.prune_every, "keep": args.prune_keep,
              "epsilon": args.prune_epsilon, "min_keep": args.prune_min_keep}
    return PruneSettings(mode=args.prune_mode,
                         **{k: v for k, v in values.items() if v is not None})


def prune_eval_command(args: argparse.Namespace, load_app_config: Callable[..., Any]) -> int:
    from bench.promptset import load_prompts
    from bench.prune_also import check_block_size, parse_also
    from bench.prune_eval import PruneEvalSettings, markdown_summary, reward_vs_tokens_chart

    also = parse_also(args.also)
    check_block_size(args.also_block_size, args.max_tokens)
    prompts = load_prompts(args.prompts_file, args.prompts)
    settings = PruneEvalSettings(prune=prune_settings(args), n=args.soft_n, lam=args.prune_lam,
                                 max_tokens=args.max_tokens, prompts=len(prompts),
                                 seed=args.seed, reward=args.reward,
                                 pass_reward=args.pass_reward, also=also,
                                 block_size=args.also_block_size)
    if settings.pass_reward is not None and not math.isfinite(settings.pass_reward):
        raise ValueError("--pass-reward must be a finite number")
    if settings.n < 2:
        raise ValueError("--soft-n must be at least 2 to prune")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="eval prune", file=sys.stderr, unit="prompt")
    report = asyncio.run(_run(load_app_config(args), prompts, settings, bar.update))
    bar.close()
    text = markdown_summary(report)
    write_atomic(out / "prune.json", json.dumps(report.to_dict(), indent=2))
    write_atomic(out / "prune.md", text + "\n")
    with atomic_path(out / "reward_vs_tokens.png") as chart:
        reward_vs_tokens_chart(report, chart)
    print(text)
    print(f"\nwritten: {out / 'prune.json'}, {out / 'prune.md'}, "
          f"{out / 'reward_vs_tokens.png'}")
    return 0


async def _run(config: Any, prompts: Any, settings: Any, tick: Any) -> Any:
    from bench.prune_eval import run_prune_eval
    from engine.runtime import start_runtime

    runtime = await start_runtime(config)
    try:
        runtime.sbon.check_prune(settings.params(True))
        return await run_prune_eval(runtime, prompts, settings, tick)
    finally:
        await runtime.close()
