"""Plain-data views of soft best-of-n results for JSON output and terminal tables."""

from __future__ import annotations

from typing import Any

from common.values import json_number
from engine.types import BlockRecord, SBoNResult


def block_summary(block: BlockRecord) -> dict[str, Any]:
    """One selection step's numbers: the choice, rewards, weights and diagnostics (and, with
    particles, whether they were resampled after the block and from which ancestors)."""
    summary = {
        "index": block.index,
        "chosen_index": block.chosen_index,
        "rewards": [json_number(r) for r in block.rewards],
        "weights": block.weights,
        "ess": block.ess,
        "kl_from_uniform": block.kl_from_uniform,
        "kl_estimate": block.kl_estimate,
        "lambda": json_number(block.lam),
    }
    if block.particles is not None:
        summary.update(resampled=block.particles.resampled, ancestors=block.particles.ancestors,
                       live=block.particles.live)
    return summary


def block_to_dict(block: BlockRecord) -> dict[str, Any]:
    return {
        **block_summary(block),
        "candidates": [
            {
                "text": c.text,
                "reward": json_number(c.reward),
                "weight": c.weight,
                "num_tokens": len(c.token_ids),
                "cumulative_logprob": c.cumulative_logprob,
                "finish_reason": c.finish_reason,
            }
            for c in block.candidates
        ],
    }


def result_to_dict(result: SBoNResult) -> dict[str, Any]:
    """Everything about one request, JSON-ready (the CLI's ``--json`` output)."""
    final = result.final_block
    pruned = _pruned_at(result)
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "chosen_index": final.chosen_index,
        "candidates": [
            {"text": c.text, "reward": None if at is not None else json_number(c.reward),
             "weight": c.weight}
            for c, at in zip(final.candidates, pruned, strict=True)
        ],
        "blocks": [block_to_dict(b) for b in result.blocks],
        "params": {
            "n": result.params.n,
            "lambda": None if result.params.kl_budget is not None
            else json_number(result.params.lam),
            "kl_budget": result.params.kl_budget,
            "block_delimiter": result.params.block_delimiter,
            "block_size": result.params.block_size,
            "normalize": result.params.normalize.value,
            "reward": result.reward_name,
            "particles": result.params.particles and result.params.blockwise,
            "ess_threshold": result.params.ess_threshold,
        },
        "diagnostics": {
            "ess": result.diagnostics.ess,
            "kl_from_uniform": result.diagnostics.kl_from_uniform,
            "kl_bon_bound": result.diagnostics.kl_bon_bound,
            "kl_estimate": result.diagnostics.kl_estimate,
            "win_rate_bound": result.diagnostics.win_rate_bound,
        },
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "tokens_generated": result.tokens_generated,
            "tokens_scored": result.tokens_scored,
            "tokens_computed": result.tokens_computed,
            "tokens_prefilled": {"generation": result.prefill_generation.computed,
                                 "scoring": result.prefill_scoring.computed},
            "tokens_cached": {"generation": result.prefill_generation.cached,
                              "scoring": result.prefill_scoring.cached},
        },
        "timings_s": result.timings,
        "prune": _prune(result),
    }


def _pruned_at(result: SBoNResult) -> list[int | None]:
    """Per candidate of the final selection: the checkpoint it was pruned at, or None."""
    if result.pruning is None:
        return [None] * len(result.final_block.candidates)
    return list(result.pruning.pruned_at)


def _prune(result: SBoNResult) -> dict[str, Any] | None:
    report = result.pruning
    if report is None:
        return None
    return {"mode": report.mode, "every": report.every, "checkpoints": report.checkpoints,
            "pruned": report.pruned, "pruned_at": report.pruned_at,
            "distortion_bound": report.distortion_bound}


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_text(result: SBoNResult, width: int = 70) -> str:
    """A human-readable table of the final selection's candidates, then diagnostics."""
    lines = []
    blockwise = len(result.blocks) > 1 or result.params.block_size is not None
    label = f"block {result.final_block.index} of {len(result.blocks)}" if blockwise else "response"
    lines.append(f"candidates ({label}; * = chosen)")
    lines.append(f"  {'#':>2}  {'reward':>9}  {'weight':>7}  text")
    pruned = _pruned_at(result)
    for i, c in enumerate(result.final_block.candidates):
        mark = "*" if i == result.final_block.chosen_index else " "
        reward = f"{c.reward:>9.3f}" if pruned[i] is None else f"{f'cut@{pruned[i]}':>9}"
        lines.append(f"{mark} {i:>2}  {reward}  {c.weight:>7.3f}  {_clip(c.text, width)}")
    d = result.diagnostics
    steps = [b.particles for b in result.blocks if b.particles is not None]
    if steps:
        lines.append(f"particles: ESS per block {' '.join(f'{s.ess:.1f}' for s in steps)}; "
                     f"resampled after {sum(s.resampled for s in steps)} of {len(steps)} blocks")
    if result.pruning is not None:
        report = result.pruning
        bound = ("" if report.distortion_bound is None
                 else f"  distortion bound {report.distortion_bound:.4f}")
        lines.append(f"pruned {report.pruned} of {len(pruned)} ({report.mode}, checkpoint "
                     f"every {report.every} tokens, {report.checkpoints} scored){bound}")
    lines += [
        "",
        "chosen text:",
        result.text,
        "",
        f"blocks {len(result.blocks)}  finish {result.finish_reason}  "
        f"tokens {result.completion_tokens} (generated {result.tokens_generated}, "
        f"computed {result.tokens_computed})",
        f"ESS {d.ess:.2f}  KL(weights||uniform) {d.kl_from_uniform:.3f}  "
        f"BoN bound {d.kl_bon_bound:.3f}  KL estimate {d.kl_estimate:.3f}  "
        f"win-rate bound {d.win_rate_bound:.3f}",
        "time: " + "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()),
    ]
    return "\n".join(lines)
