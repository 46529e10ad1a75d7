"""The measurement subcommands: ``sbon bench`` (speed), ``sbon eval`` (reward against KL)
and ``sbon export`` (distillation logs as training data).

Each writes a table to the terminal, a JSON file and a PNG chart (and, for eval, a Markdown
table) into ``--out``, with a progress bar on stderr while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.files import CHECKPOINT_NAME, EvalCheckpoint, atomic_path, run_key, write_atomic
from bench.prune_cli import (
    add_prune_args,
    add_prune_eval_args,
    prune_eval_command,
    prune_settings,
)
from common.values import lambda_value

PROMPTS_FILE_HELP = "JSONL prompts, or a shipped set: prompts (default), verifiable"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers"
                                         ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def _floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of lambdas (numbers >= 0, or 'inf' / 'off')."""
    try:
        values = tuple(lambda_value(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not values:
        raise argparse.ArgumentTypeError("give at least one lambda")
    return values


def lambda_arg(text: str) -> float:
    """One selection temperature: a number >= 0, or 'inf' / 'off' (the shared parser)."""
    try:
        return lambda_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_measure_commands(
    sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register ``bench``, ``eval`` and ``export`` on the ``sbon`` command."""
    bench = sub.add_parser("bench", help="throughput and latency against plain vLLM sampling")
    add_config_args(bench)
    bench.add_argument("--url", help="measure a running server instead of an in-process engine")
    bench.add_argument("--n", type=int, default=4, help="candidates per selection")
    bench.add_argument("--lam", type=lambda_arg, default=1.0,
                       help="selection temperature ('inf' = base model)")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--block-sizes", type=_ints, default=(16, 32),
                       help="comma-separated block sizes of the blockwise runs")
    bench.add_argument("--concurrency", type=_ints, default=(1, 2),
                       help="comma-separated levels: requests in flight at once")
    bench.add_argument("--prompts", type=int, default=4, help="prompts per method and level")
    bench.add_argument("--prompts-file", help=PROMPTS_FILE_HELP)
    bench.add_argument("--reward", help="a configured reward's name")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-naive", action="store_true", help="skip the naive design")
    bench.add_argument("--out", default="sbon-bench", help="folder for JSON and PNG")
    add_prune_args(bench, "with --prune-mode: also time per-response soft best-of-n with "
                   "this pruning rule (the method 'pruned')")
    bench.set_defaults(handler=_bench)

    evaluate = sub.add_parser("eval", help="reward against KL for a grid of n and lambda")
    add_config_args(evaluate)
    evaluate.add_argument("--n-grid", type=_ints, default=(1, 2, 4, 8))
    evaluate.add_argument("--lambda-grid", type=_floats, default=(0.1, 0.3, 1.0, 3.0, math.inf))
    evaluate.add_argument("--soft-n", type=int, default=8, help="n of the soft and blockwise runs")
    evaluate.add_argument("--block-sizes", type=_ints, default=(16,))
    evaluate.add_argument("--no-blockwise", action="store_true")
    evaluate.add_argument("--blockwise-lam", type=lambda_arg, default=1.0)
    evaluate.add_argument("--pool", type=int, default=32,
                          help="base samples per prompt (several times the largest n)")
    evaluate.add_argument("--draws", type=int, default=200, help="selections per prompt")
    evaluate.add_argument("--prompts", type=int, default=16)
    evaluate.add_argument("--prompts-file", help=PROMPTS_FILE_HELP)
    evaluate.add_argument("--max-tokens", type=int, default=48)
    evaluate.add_argument("--reward", help="a configured reward's name")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="sbon-eval", help="folder for JSON, Markdown, PNG")
    add_prune_eval_args(evaluate)
    evaluate.set_defaults(handler=_eval)

    export = sub.add_parser(
        "export", help="turn distillation logs into training data (pairs, sft, scored)")
    export.add_argument("log_dir", metavar="LOG_DIR", help="the datalog folder (or one file)")
    export.add_argument("--format", required=True, choices=("pairs", "sft", "scored"),
                        dest="data_format", help="pairs: prompt/chosen/rejected; sft: "
                        "prompt/completion; scored: prompt/completions/rewards/weights")
    export.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    export.add_argument("--as", dest="as_", choices=("jsonl", "parquet"),
                        help="output format when the extension does not say")
    export.add_argument("--only", choices=("chat", "text"),
                        help="export only records with chat (or only with text) prompts")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace, load_app_config: Callable[..., Any]) -> int:
    from bench.export import export

    stats = export(args.log_dir, args.data_format, args.out, args.as_, args.only)
    print(f"{args.out}: {stats.summary()}", file=sys.stderr)
    return 0


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, file=sys.stderr, unit="req", dynamic_ncols=True)


def _quiet_engine() -> None:
    # The terminal shows the progress bar and the table, not the engine's own logging.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _bench(args: argparse.Namespace, load_app_config: Callable[..., Any]) -> int:
    from bench.bench import BenchSettings, render_table
    from bench.plots import bench_chart
    from bench.promptset import load_prompts

    settings = BenchSettings(n=args.n, lam=args.lam, max_tokens=args.max_tokens,
                             block_sizes=args.block_sizes, concurrency=args.concurrency,
                             prompts=args.prompts, seed=args.seed, reward=args.reward,
                             naive=not args.no_naive and not args.url,
                             prune=prune_settings(args))
    prompts = load_prompts(args.prompts_file, args.prompts)
    total = len(settings.methods()) * (1 + len(settings.concurrency) * len(prompts))
    bar = _progress(total, "bench")
    if args.url:
        report = asyncio.run(_bench_http(args.url, prompts, settings, bar.update))
    else:
        _quiet_engine()
        report = asyncio.run(_bench_local(load_app_config(args), prompts, settings, bar.update))
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps(report.to_dict(), indent=2))
    with atomic_path(out / "bench.png") as chart:
        bench_chart(report, chart)
    print(render_table(report))
    print(f"\nwritten: {out / 'bench.json'}, {out / 'bench.png'}")
    return 0


async def _bench_local(config: Any, prompts: Any, settings: Any, tick: Any) -> Any:
    from bench.bench import InProcessTarget, run_bench
    from engine.runtime import start_runtime

    runtime = await start_runtime(config)
    try:
        return await run_bench(InProcessTarget(runtime, prompts, settings), settings, tick)
    finally:
        await runtime.close()


async def _bench_http(url: str, prompts: Any, settings: Any, tick: Any) -> Any:
    import httpx

    from bench.bench import run_bench
    from bench.http import HTTPTarget

    async with httpx.AsyncClient(timeout=3600) as client:
        target = await HTTPTarget.connect(url, prompts, settings, client)
        return await run_bench(target, settings, tick)


def _eval(args: argparse.Namespace, load_app_config: Callable[..., Any]) -> int:
    if args.prune_mode:
        _quiet_engine()
        return prune_eval_command(args, load_app_config)
    if args.also is not None:
        raise ValueError("--also needs --prune-mode (it adds methods to the pruning chart)")
    from bench.evaluate import EvalSettings, markdown_table
    from bench.plots import eval_chart
    from bench.promptset import load_prompts

    settings = EvalSettings(
        n_grid=args.n_grid, lam_grid=args.lambda_grid, soft_n=args.soft_n,
        block_sizes=() if args.no_blockwise else args.block_sizes,
        blockwise_lam=args.blockwise_lam, pool=args.pool, draws=args.draws,
        prompts=args.prompts, max_tokens=args.max_tokens, seed=args.seed, reward=args.reward)
    settings.check()
    prompts = load_prompts(args.prompts_file, args.prompts)
    settings = dataclasses.replace(settings, prompts=len(prompts))
    _quiet_engine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each prompt's finished work is kept as it completes: an interrupted run resumes.
    checkpoint = EvalCheckpoint(out / CHECKPOINT_NAME, run_key(settings, prompts))
    if checkpoint.resumed:
        print(f"resuming: {checkpoint.resumed} finished pieces in {checkpoint.path}",
              file=sys.stderr)
    bar = _progress(len(prompts) * (1 + len(settings.block_sizes)), "eval")
    report = asyncio.run(_eval_local(load_app_config(args), prompts, settings, bar.update,
                                     checkpoint))
    bar.close()
    table = markdown_table(report)
    write_atomic(out / "eval.json", json.dumps(report.to_dict(), indent=2))
    write_atomic(out / "eval.md", table + "\n")
    with atomic_path(out / "eval.png") as chart:
        eval_chart(report, chart)
    checkpoint.remove()
    print(table)
    print(f"\nwritten: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return 0


async def _eval_local(config: Any, prompts: Any, settings: Any, tick: Any,
                      checkpoint: Any = None) -> Any:
    from bench.evaluate import run_eval
    from engine.runtime import start_runtime

    runtime = await start_runtime(config)
    try:
        return await run_eval(runtime, prompts, settings, tick, checkpoint)
    finally:
        await runtime.close()
