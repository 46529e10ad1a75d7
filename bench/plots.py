"""PNG charts of the measurement commands (matplotlib, no display needed)."""

from __future__ import annotations

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
    """Reward and win rate against KL(weights || uniform), one curve per method."""
    plt = _pyplot()
    rows = report.rows()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {BON: ("o-", "n"), SOFT: ("s-", "lambda"), BLOCKWISE: ("^", "block_size")}
    for method, (style, key) in styles.items():
        chosen = [r for r in rows if r["method"] == method]
        if not chosen:
            continue
        label = {BON: "best-of-n (lambda = 0), n grows",
                 SOFT: f"soft best-of-n, n = {report.settings.soft_n}, lambda varies",
                 BLOCKWISE: f"blockwise, n = {report.settings.soft_n}, "
                            f"lambda = {report.settings.blockwise_lam:g}"}[method]
        xs = [r["kl_from_uniform"] for r in chosen]
        for axis, field in ((left, "reward"), (right, "win_rate")):
            axis.plot(xs, [r[field] for r in chosen], style, label=label)
            for x, r in zip(xs, chosen, strict=True):
                axis.annotate(f"{key[0] if key != 'lambda' else 'λ'}={r[key]}", (x, r[field]),
                              fontsize=7, textcoords="offset points", xytext=(4, 4))
    left.axhline(rows[0]["base_reward"], color="grey", linestyle=":", label="base model")
    right.axhline(0.5, color="grey", linestyle=":", label="1/2 (base against base)")
    left.set_ylabel("mean reward of the selected response")
    right.set_ylabel("win rate against a base sample")
    for axis in (left, right):
        axis.set_xlabel("KL of the selection weights from uniform (nats; bounds KL to base)")
        axis.legend(fontsize=8)
    fig.suptitle(f"sbon eval: {report.settings.prompts} prompts, pool {report.settings.pool}, "
                 f"{report.settings.max_tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
