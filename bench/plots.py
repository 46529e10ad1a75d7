"""PNG charts of the measurement commands (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.bench import BenchReport
from bench.evaluate import BLOCKWISE, BON, SOFT, EvalReport


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_chart(report: BenchReport, path: Path) -> Path:
    """Generated tokens per second and latency per method, grouped by concurrency."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r.method for r in report.runs))
    levels = list(dict.fromkeys(r.concurrency for r in report.runs))
    width = 0.8 / max(1, len(levels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, level in enumerate(levels):
        runs = {r.method: r for r in report.runs if r.concurrency == level}
        xs = [i + k * width for i in range(len(methods))]
        left.bar(xs, [runs[m].generated_tokens_per_s if m in runs else 0 for m in methods],
                 width, label=f"concurrency {level}")
        p50 = [runs[m].latency(50) if m in runs else 0 for m in methods]
        p95 = [runs[m].latency(95) if m in runs else 0 for m in methods]
        right.bar(xs, p50, width, label=f"p50, concurrency {level}")
        right.scatter(xs, p95, marker="_", s=200, color="black",
                      label="p95" if k == 0 else None)
    for axis, title in ((left, "generated tokens / s (all candidates)"),
                        (right, "latency per request (s)")):
        axis.set_xticks([i + width * (len(levels) - 1) / 2 for i in range(len(methods))])
        axis.set_xticklabels(methods, rotation=20)
        axis.set_title(title)
        axis.legend(fontsize=8)
    s = report.settings
    fig.suptitle(f"sbon bench: n={s.n}, lambda={s.lam:g}, max_tokens={s.max_tokens}, "
                 f"{s.prompts} prompts ({report.target})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_chart(report: EvalReport, path: Path) -> Path:
    """Reward and win rate against the pool-based KL estimate, one curve per method.

    Every pool setting sits at its KL(selection probabilities ‖ uniform over the pool); hard
    best-of-n is also marked at its analytic bound log n - (n-1)/n. Blockwise runs are not
    drawn from the pool and have no such estimate: they show as a level line.
    """
    plt = _pyplot()
    rows = report.rows()
    s = report.settings
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = {BON: ("o-", "n", "best-of-n (lambda = 0), n grows"),
              SOFT: ("s-", "λ", f"soft best-of-n, n = {s.soft_n}, lambda varies")}
    for method, (style, key, label) in curves.items():
        chosen = [r for r in rows if r["method"] == method and r["kl_pool"] is not None]
        if not chosen:
            continue
        xs = [r["kl_pool"] for r in chosen]
        for axis, field in ((left, "reward"), (right, "win_rate")):
            ys = [r[field] for r in chosen]
            axis.plot(xs, ys, style, label=label)
            for x, y, r in zip(xs, ys, chosen, strict=True):
                value = r["n"] if method == BON else r["lambda"]
                axis.annotate(f"{key}={value}", (x, y), fontsize=7, textcoords="offset points",
                              xytext=(4, 4))
            if method == BON:
                bounds = [r["kl_bon_bound"] for r in chosen]
                axis.scatter(bounds, ys, marker="|", s=150, color="black",
                             label="best-of-n at its analytic bound log n - (n-1)/n")
                for x, bound, y in zip(xs, bounds, ys, strict=True):
                    axis.plot([x, bound], [y, y], ":", color="black", linewidth=0.8)
    for r in rows:
        if r["method"] == BLOCKWISE:
            label = (f"blockwise B = {r['block_size']}, n = {s.soft_n}, "
                     f"lambda = {s.blockwise_lam:g} (no pool KL: level only)")
            left.axhline(r["reward"], color="tab:green", linestyle="--", label=label)
            right.axhline(r["win_rate"], color="tab:green", linestyle="--", label=label)
    left.axhline(rows[0]["base_reward"], color="grey", linestyle=":", label="base model")
    right.axhline(0.5, color="grey", linestyle=":", label="1/2 (base against base)")
    left.set_ylabel("mean reward of the selected response")
    right.set_ylabel("win rate against a base sample")
    for axis in (left, right):
        axis.set_xlabel("KL(selection probabilities ‖ uniform over the pool), nats")
        axis.legend(fontsize=7)
    fig.suptitle(f"sbon eval: {s.prompts} prompts, pool {s.pool}, {s.max_tokens} tokens; "
                 f"pool KL estimate for every method (at most log {s.pool} = "
                 f"{math.log(s.pool):.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
