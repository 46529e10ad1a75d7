"""The ``sbon`` command: serve, generate, prepare-model, and the bench and eval commands.

Heavy imports (the engine, torch, vLLM) happen inside the subcommands, so ``sbon --help``
is instant and each subcommand loads only what it uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_NAME = "config.yaml"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (default: ./config.yaml if present, "
                        "or $SBON_CONFIG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting, e.g. engine.dtype=bfloat16")


def config_path(arg: str | None) -> str | None:
    """The configuration file in force: the flag, then $SBON_CONFIG, then ./config.yaml."""
    if arg:
        return arg
    if os.environ.get("SBON_CONFIG"):
        return os.environ["SBON_CONFIG"]
    return DEFAULT_CONFIG_NAME if Path(DEFAULT_CONFIG_NAME).is_file() else None


def load_app_config(args: argparse.Namespace, extra: list[str] | None = None) -> Any:
    from common.config import load_config

    return load_config(config_path(args.config), list(args.overrides) + (extra or []))


def build_parser() -> argparse.ArgumentParser:
    from bench.cli import add_measure_commands, lambda_arg
    from cli.serve_ray import add_serve_ray_command

    parser = argparse.ArgumentParser(prog="sbon", description="Soft best-of-n decoding on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_config_args(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    gen = sub.add_parser("generate", help="answer one prompt with soft best-of-n")
    _add_config_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--n", type=int, help="number of candidates")
    gen.add_argument("--lam", type=lambda_arg,
                     help="selection temperature (0 = best-of-n, inf = off)")
    gen.add_argument("--block-size", type=int, help="tokens per block (omit: whole response)")
    gen.add_argument("--kl-budget", type=float,
                     help="nats of KL from uniform per selection; lambda is solved per "
                          "selection (instead of --lam)")
    gen.add_argument("--block-delimiter",
                     help="a block also ends after this string, e.g. a blank line: one "
                          "block per reasoning step (needs --block-size)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--reward", help="a configured reward's name")
    gen.add_argument("--normalize", choices=["raw", "zscore"])
    gen.add_argument("--prune-mode", choices=["rank", "bound", "off"],
                     help="stop candidates early (per-response mode): rank keeps the best "
                          "fraction by partial reward, bound prunes what reward bounds prove "
                          "negligible; off overrides a configured default")
    gen.add_argument("--prune-every", type=int, help="tokens between checkpoints (16)")
    gen.add_argument("--prune-keep", type=float, help="rank: fraction kept per checkpoint")
    gen.add_argument("--prune-epsilon", type=float,
                     help="bound: selection probability pruning may move in total")
    gen.add_argument("--prune-min-keep", type=int, help="never fewer candidates than this")
    gen.add_argument("--particles", action="store_true", default=None,
                     help="blockwise: keep n weighted particles, resampled when the ESS is low")
    gen.add_argument("--ess-threshold", type=float,
                     help="particles: resample when ESS < this x n, in (0, 1] (0.5)")
    gen.add_argument("--raw-prompt", action="store_true",
                     help="send the prompt as plain text instead of a chat message")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    prep = sub.add_parser("prepare-model", help="prepare the embedded default model's folder")
    _add_config_args(prep)

    add_measure_commands(sub, _add_config_args)
    add_serve_ray_command(sub, _add_config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The engine logs to stdout by default; stdout belongs to the command's own output.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "prepare-model":
            return _prepare(args)
        return int(args.handler(args, load_app_config))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"sbon: error: {exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    from engine.model_prep import resolve_model_path

    config = load_app_config(args)
    print(resolve_model_path(config.model))
    return 0


def _serve(args: argparse.Namespace) -> int:
    extra = []
    if args.host:
        extra.append(f"server.host={args.host}")
    if args.port is not None:
        extra.append(f"server.port={args.port}")
    config = load_app_config(args, extra)
    from server.app import run_server

    return run_server(config)


def _generate(args: argparse.Namespace) -> int:
    # Keep stdout for the result: the engine's own logging goes quiet below warnings.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from cli.report import render_text, result_to_dict

    config = load_app_config(args)
    result = asyncio.run(_generate_async(config, args))
    if args.json:
        print(json.dumps(result_to_dict(result), indent=2))
    else:
        print(render_text(result))
    return 0


async def _generate_async(config: Any, args: argparse.Namespace) -> Any:
    from common.config import Normalization
    from common.prompts import Message
    from engine.resolve import SBoNOverrides, resolve_params
    from engine.runtime import start_runtime
    from engine.types import SamplingSettings

    if (args.n is not None and args.n < 1) or (args.block_size is not None
                                                and args.block_size < 1):
        raise ValueError("--n and --block-size must be positive")
    if args.kl_budget is not None and (args.kl_budget < 0 or args.lam is not None):
        raise ValueError("--kl-budget must be >= 0 and cannot be given with --lam")
    params = resolve_params(config.sbon, SBoNOverrides(
        n=args.n, lam=args.lam, block_size=args.block_size,
        # Pruning works per response: asking for it without --block-size means per response.
        block_size_given=args.block_size is not None or args.prune_mode not in (None, "off"),
        normalize=Normalization(args.normalize) if args.normalize else None,
        reward=args.reward, kl_budget=args.kl_budget,
        block_delimiter=_unescape(args.block_delimiter),
        prune=_prune_settings(args), prune_given=args.prune_mode is not None,
        particles=args.particles, ess_threshold=args.ess_threshold))
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
    prompt: Any = args.prompt if args.raw_prompt else (Message("user", args.prompt),)
    runtime = await start_runtime(config)
    try:
        runtime.sbon.scorer_for(params.reward)
        runtime.sbon.check_prune(params)
        return await runtime.sbon.run(prompt, params, sampling, f"cli-{uuid.uuid4().hex}")
    except KeyError as exc:
        raise ValueError(f"unknown reward {exc}; configured: {sorted(runtime.scorers)}") from exc
    finally:
        await runtime.close()


def _prune_settings(args: argparse.Namespace) -> Any:
    """The ``--prune-*`` flags as validated settings (None: off or not asked for)."""
    from common.prune import PruneSettings

    if args.prune_mode in (None, "off"):
        given = [f for f in ("prune_every", "prune_keep", "prune_epsilon", "prune_min_keep")
                 if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --prune-mode rank or bound")
        return None
    values = {"every": args.prune_every, "keep": args.prune_keep,
              "epsilon": args.prune_epsilon, "min_keep": args.prune_min_keep}
    return PruneSettings(mode=args.prune_mode,
                         **{k: v for k, v in values.items() if v is not None})


def _unescape(text: str | None) -> str | None:
    """Shell-friendly escapes in a delimiter: ``\\n`` is a newline, ``\\t`` a tab."""
    if text is None:
        return None
    return text.replace("\\n", "\n").replace("\\t", "\t")


if __name__ == "__main__":
    sys.exit(main())
