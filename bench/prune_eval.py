"""``sbon eval --prune-mode``: what early pruning costs in distortion and saves in tokens.

Per prompt, one seeded request runs unpruned (every candidate to the end, every final
reward) and one with pruning, on the same seeds, each from an empty prefix cache. The rule
is then replayed offline on the unpruned candidates (engine/pruned.py :func:`replay`, the
decisions the online run takes, which is checked), so its distortion is exact: the total
variation between pruned and unpruned selection is the unpruned weight of the pruned
candidates (docs/maths.md, pruning). The first k of the n unpruned candidates are what an
unpruned request with k candidates draws: the "use fewer candidates" curve, same samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.promptset import PromptItem
from bench.prune_also import (
    AlsoOutcome,
    also_lines,
    also_rows,
    method_params,
    paired_difference,
    run_method,
)
from common.prune import PruneSettings
from common.values import json_number
from engine.pruned import Checkpointer, checkpoint_block, replay, view_at
from engine.pruning import Pruner, pruned_mass
from engine.seeds import run_seed
from engine.selection import selection_weights
from engine.types import Candidate, SamplingSettings, SBoNParams, SBoNResult

PRUNE_STREAM = 3  # seeds of their own, apart from the pool's and blockwise runs'
Z95 = 1.959964


@dataclass(frozen=True)
class PruneEvalSettings:
    """One pruning rule at one n and lambda, over a prompt set."""

    prune: PruneSettings
    n: int = 8
    lam: float = 1.0
    max_tokens: int = 48
    prompts: int = 16
    temperature: float = 1.0
    seed: int = 0
    reward: str | None = None
    fewer: tuple[int, ...] = (1, 2, 4, 8)  # the unpruned baselines with fewer candidates
    pass_reward: float | None = None  # a selection "passes" with a reward at least this
    also: tuple[str, ...] = ()  # more methods on the chart: blockwise, particles
    block_size: int = 16  # their block size

    def sampling(self, index: int) -> SamplingSettings:
        return SamplingSettings(temperature=self.temperature, max_tokens=self.max_tokens,
                                seed=run_seed(self.seed, index, PRUNE_STREAM))

    def params(self, prune: bool) -> SBoNParams:
        return SBoNParams(n=self.n, lam=self.lam, reward=self.reward,
                          prune=self.prune if prune else None)


@dataclass
class PromptOutcome:
    """One prompt's unpruned and pruned requests and the replay's exact figures."""

    prompt_id: str
    tv: float  # total variation between pruned and unpruned selection (pruned mass)
    choice_pruned: bool  # the unpruned request's choice was among the pruned
    agrees: bool  # the online run took the replay's decisions
    pruned: int
    reward_unpruned: float  # expected reward of the unpruned selection, sum w_i r_i
    reward_pruned: float  # expected reward over the survivors (weights renormalised)
    decoded_unpruned: int
    decoded_pruned: int  # tokens the pruned candidates would have decoded, replayed
    computed_unpruned: int  # tokens_computed of the real requests
    computed_pruned: int
    correlations: dict[int, float | None] = field(default_factory=dict)  # per checkpoint
    fewer: dict[int, tuple[float, int]] = field(default_factory=dict)  # k -> reward, decoded
    fewer_computed: dict[int, float] = field(default_factory=dict)  # k -> computed (estimate)
    # With ``pass_reward``: the chance the selection passes (k -> the fewer-candidate one).
    pass_unpruned: float | None = None
    pass_pruned: float | None = None
    fewer_pass: dict[int, float] = field(default_factory=dict)
    also: dict[str, AlsoOutcome] = field(default_factory=dict)  # method -> its request


def expected_reward(rewards: Sequence[float], lam: float, keep: Sequence[bool] | None = None,
                    values: Sequence[float] | None = None) -> float:
    """Sum of w_i r_i with w the selection weights over the kept candidates (of w_i v_i
    with ``values``: the mean of another quantity under the same selection)."""
    kept = [i for i in range(len(rewards)) if keep is None or keep[i]]
    weights = selection_weights([rewards[i] for i in kept], lam)
    averaged = rewards if values is None else values
    return sum(w * averaged[i] for w, i in zip(weights, kept, strict=True) if w > 0)


def expected_pass(rewards: Sequence[float], lam: float, threshold: float,
                  keep: Sequence[bool] | None = None) -> float:
    """The chance the selection's reward is at least ``threshold``: sum of w_i [r_i >= t]."""
    return expected_reward(rewards, lam, keep, [1.0 if r >= threshold else 0.0 for r in rewards])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if len(x) < 3 or len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return float(statistics.correlation(rx, ry))


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def _candidates(result: SBoNResult) -> list[Candidate]:
    return [Candidate(c.token_ids, c.text, c.cumulative_logprob, c.finish_reason,
                      c.stop_reason) for c in result.final_block.candidates]


def decoded_after_pruning(candidates: Sequence[Candidate], pruned_at: Sequence[int | None]
                          ) -> int:
    """Tokens decoded when each pruned candidate stops at its checkpoint."""
    return sum(c.num_tokens if at is None else min(c.num_tokens, at)
               for c, at in zip(candidates, pruned_at, strict=True))


async def _correlations(checkpointer: Checkpointer, candidates: Sequence[Candidate],
                        finals: Sequence[float], settings: PruneEvalSettings,
                        decode: Callable[[Sequence[int]], str]) -> dict[int, float | None]:
    """Per nominal checkpoint (``checkpointer`` without a block size, so that every prompt
    has the same ones): rank correlation of every candidate's partial reward (its final one
    once finished) with its final reward."""
    out: dict[int, float | None] = {}
    for checkpoint in checkpointer.positions(settings.max_tokens):
        views = {i: view_at(c.token_ids, c, checkpoint, decode)
                 for i, c in enumerate(candidates)}
        running = {i: v for i, v in views.items() if not v.finished}
        if not running:
            break
        partial = dict(enumerate(finals))
        partial.update(await checkpointer.score(running))
        out[checkpoint] = spearman([partial[i] for i in range(len(candidates))], finals)
    return out


async def evaluate_prompt(runtime: Any, item: PromptItem, index: int,
                          settings: PruneEvalSettings) -> PromptOutcome:
    """The unpruned and the pruned request of one prompt, and the replay on the former."""
    sampling = settings.sampling(index)
    # Each request starts from an empty prefix cache: the second must not find the first's
    # prompt, or the reward queries of the very same candidates, already computed.
    await _reset_prefix_cache(runtime)
    full = await runtime.sbon.run(item.prompt, settings.params(False), sampling,
                                  f"eval-prune-full-{index}")
    await _reset_prefix_cache(runtime)
    online = await runtime.sbon.run(item.prompt, settings.params(True), sampling,
                                    f"eval-prune-{index}")
    key, _ = runtime.sbon.scorer_for(settings.reward)
    scorer = runtime.sbon.scorers[key]
    prompt_ids = runtime.backend.encode_prompt(item.prompt)
    decode = runtime.backend.decode
    candidates = _candidates(full)
    finals = full.final_block.rewards
    block = checkpoint_block(scorer, getattr(runtime.backend, "kv_block_tokens", None))
    pruner = await replay(Checkpointer(Pruner(settings.prune, settings.n, settings.lam), scorer,
                                       item.prompt, prompt_ids, block=block),
                          candidates, settings.max_tokens, decode)
    weights = selection_weights(finals, settings.lam)
    keep = [at is None for at in pruner.pruned_at]
    outcome = PromptOutcome(
        prompt_id=item.id, tv=pruned_mass(weights, pruner.pruned_at),
        choice_pruned=pruner.pruned_at[full.chosen_index] is not None,
        agrees=online.pruning is not None and online.pruning.pruned_at == pruner.pruned_at,
        pruned=sum(1 for k in keep if not k),
        reward_unpruned=expected_reward(finals, settings.lam),
        reward_pruned=expected_reward(finals, settings.lam, keep),
        decoded_unpruned=sum(c.num_tokens for c in candidates),
        decoded_pruned=decoded_after_pruning(candidates, pruner.pruned_at),
        computed_unpruned=full.tokens_computed, computed_pruned=online.tokens_computed)
    outcome.correlations = await _correlations(
        Checkpointer(pruner, scorer, item.prompt, prompt_ids), candidates, finals, settings,
        decode)
    for k in settings.fewer:
        if k < settings.n:
            outcome.fewer[k] = (expected_reward(finals[:k], settings.lam),
                                sum(c.num_tokens for c in candidates[:k]))
            outcome.fewer_computed[k] = fewer_computed(full, candidates, k)
    if settings.pass_reward is not None:
        _add_pass_rates(outcome, finals, keep, settings)
    for method in settings.also:
        params = method_params(method, settings.n, settings.lam, settings.reward,
                               settings.block_size)
        outcome.also[method] = await run_method(runtime, item.prompt, params, sampling,
                                                f"eval-{method}-{index}", settings.pass_reward)
    return outcome


def _add_pass_rates(outcome: PromptOutcome, finals: Sequence[float], keep: Sequence[bool],
                    settings: PruneEvalSettings) -> None:
    threshold, lam = settings.pass_reward, settings.lam
    if threshold is None:
        return
    outcome.pass_unpruned = expected_pass(finals, lam, threshold)
    outcome.pass_pruned = expected_pass(finals, lam, threshold, keep)
    outcome.fewer_pass = {k: expected_pass(finals[:k], lam, threshold)
                          for k in settings.fewer if k < settings.n}


def fewer_computed(full: SBoNResult, candidates: Sequence[Candidate], k: int) -> float:
    """Computed tokens of an unpruned request with the first ``k`` of its candidates: the
    same prompt prefill, their decoded tokens, and ``k / n`` of the scoring prefill (every
    candidate's reward query costs alike in expectation; an estimate, not a measurement)."""
    n = len(candidates)
    scoring = full.prefill_scoring.computed
    decoded_rest = sum(c.num_tokens for c in candidates[k:])
    return full.tokens_computed - decoded_rest - scoring * (n - k) / n


async def _reset_prefix_cache(runtime: Any) -> None:
    for part in (runtime.backend, *getattr(runtime, "scorers", {}).values()):
        reset = getattr(part, "reset_prefix_cache", None)
        if reset is not None:
            await reset()


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval."""
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, half


@dataclass
class PruneEvalReport:
    settings: PruneEvalSettings
    outcomes: list[PromptOutcome]

    def summary(self) -> dict[str, Any]:
        """Means with 95 % intervals over prompts; the cost curve; correlations."""
        o = self.outcomes

        def stat(values: Sequence[float]) -> dict[str, float]:
            mean, half = mean_ci(values)
            return {"mean": mean, "ci95": half}

        checkpoints_seen = sorted({k for x in o for k in x.correlations})
        curve = [{"label": f"unpruned n={k}", "n": k,
                  "reward": stat([x.fewer[k][0] for x in o]),
                  "decoded_tokens": stat([float(x.fewer[k][1]) for x in o]),
                  "computed_tokens": stat([x.fewer_computed[k] for x in o])}
                 for k in self.settings.fewer if k < self.settings.n]
        curve.append({"label": f"unpruned n={self.settings.n}", "n": self.settings.n,
                      "reward": stat([x.reward_unpruned for x in o]),
                      "decoded_tokens": stat([float(x.decoded_unpruned) for x in o]),
                      "computed_tokens": stat([float(x.computed_unpruned) for x in o])})
        curve.append({"label": f"pruned n={self.settings.n} ({self.settings.prune.mode})",
                      "n": self.settings.n, "reward": stat([x.reward_pruned for x in o]),
                      "decoded_tokens": stat([float(x.decoded_pruned) for x in o]),
                      "computed_tokens": stat([float(x.computed_pruned) for x in o])})
        passing = _pass_rates(o, self.settings, stat, curve)
        also = [x.also for x in o]
        curve += also_rows(also, self.settings.also, self.settings.n, self.settings.block_size,
                           stat)
        return {
            "prompts": len(o),
            "tv": stat([x.tv for x in o]), "tv_max": max(x.tv for x in o),
            "choice_pruned_rate": statistics.fmean(float(x.choice_pruned) for x in o),
            "online_agrees_with_replay": sum(1 for x in o if x.agrees),
            "pruned_per_request": stat([float(x.pruned) for x in o]),
            "decoded_saved": 1 - sum(x.decoded_pruned for x in o) / max(
                1, sum(x.decoded_unpruned for x in o)),
            "computed_saved": 1 - sum(x.computed_pruned for x in o) / max(
                1, sum(x.computed_unpruned for x in o)),
            "computed_tokens": {"unpruned": stat([float(x.computed_unpruned) for x in o]),
                                "pruned": stat([float(x.computed_pruned) for x in o])},
            "rank_correlation": {str(k): _mean_defined([x.correlations.get(k) for x in o])
                                 for k in checkpoints_seen},
            "curve": curve,
            # Paired over prompts (the same samples): pruned minus unpruned with fewer.
            "pruned_minus_fewer": {str(k): stat([x.reward_pruned - x.fewer[k][0] for x in o])
                                   for k in self.settings.fewer if k < self.settings.n},
            "pruned_minus_fewer_computed": {
                str(k): stat([x.computed_pruned - x.fewer_computed[k] for x in o])
                for k in self.settings.fewer if k < self.settings.n},
            **passing,
            "also": list(self.settings.also),
            "particles_minus_blockwise": paired_difference(also, stat),
        }

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings["lam"] = json_number(self.settings.lam)
        settings["prune"] = self.settings.prune.model_dump()
        return {"settings": settings, "summary": self.summary(),
                "per_prompt": [asdict(x) for x in self.outcomes]}


def _pass_rates(o: Sequence[PromptOutcome], settings: PruneEvalSettings,
                stat: Callable[[Sequence[float]], dict[str, float]],
                curve: list[dict[str, Any]]) -> dict[str, Any]:
    """With ``pass_reward``: each curve row's pass rate, and pruned minus fewer, paired."""
    if settings.pass_reward is None:
        return {}
    fewer = [k for k in settings.fewer if k < settings.n]
    rows = [[x.fewer_pass[k] for x in o] for k in fewer]
    rows += [[x.pass_unpruned or 0.0 for x in o], [x.pass_pruned or 0.0 for x in o]]
    for row, values in zip(curve, rows, strict=True):
        row["pass_rate"] = stat(values)
    return {"pass_reward": settings.pass_reward,
            "pruned_minus_fewer_pass": {
                str(k): stat([(x.pass_pruned or 0.0) - x.fewer_pass[k] for x in o])
                for k in fewer}}


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


async def run_prune_eval(runtime: Any, prompts: Sequence[PromptItem],
                         settings: PruneEvalSettings,
                         progress: Callable[[int], Any] | None = None) -> PruneEvalReport:
    """Every prompt in turn (the two requests of a prompt run one after the other)."""
    tick = progress or (lambda _: None)
    outcomes = []
    for index, item in enumerate(list(prompts)[: settings.prompts]):
        outcomes.append(await evaluate_prompt(runtime, item, index, settings))
        tick(1)
    return PruneEvalReport(settings, outcomes)


def markdown_summary(report: PruneEvalReport) -> str:
    """The figures a reader needs, as Markdown."""
    s, p = report.summary(), report.settings
    knob = (f"keep {p.prune.keep:g}" if p.prune.mode == "rank"
            else f"epsilon {p.prune.epsilon:g}")
    rule = f"{p.prune.mode}, every {p.prune.every} tokens, {knob}, min_keep {p.prune.min_keep}"
    lines = [
        f"Pruning ({rule}) at n = {p.n}, lambda = {p.lam:g}, {s['prompts']} prompts, "
        f"max_tokens {p.max_tokens}.",
        "",
        "| figure | value |", "|---|---|",
        f"| TV(pruned, unpruned selection), mean ± 95 % | {s['tv']['mean']:.4f} ± "
        f"{s['tv']['ci95']:.4f} (max {s['tv_max']:.4f}) |",
        f"| unpruned choice was pruned | {s['choice_pruned_rate']:.3f} of requests |",
        f"| online decisions equal to the replay | {s['online_agrees_with_replay']} of "
        f"{s['prompts']} |",
        f"| candidates pruned per request | {s['pruned_per_request']['mean']:.2f} |",
        f"| decoded tokens saved (replay) | {100 * s['decoded_saved']:.1f} % |",
        f"| computed tokens saved (real requests) | {100 * s['computed_saved']:.1f} % |",
    ]
    for k, rho in s["rank_correlation"].items():
        lines.append(f"| rank correlation partial vs final at {k} tokens | "
                     f"{'n/a' if rho is None else f'{rho:.3f}'} |")
    lines += ["", "| selection | expected reward ± 95 % | decoded tokens | computed tokens "
              "± 95 % |", "|---|---|---|---|"]
    for row in s["curve"]:
        computed = row["computed_tokens"]
        lines.append(f"| {row['label']} | {row['reward']['mean']:.4f} ± "
                     f"{row['reward']['ci95']:.4f} | {row['decoded_tokens']['mean']:.1f} | "
                     f"{computed['mean']:.1f} ± {computed['ci95']:.1f} |")
    lines += ["", "Computed tokens of the fewer-candidate rows are estimated from the n-candidate "
              "request (its prompt prefill, their decoded tokens, k / n of its scoring); the "
              "others are measured."]
    lines += ["", "| pruned minus unpruned with fewer candidates (paired by prompt) | "
              "reward difference ± 95 % | computed tokens difference ± 95 % |", "|---|---|---|"]
    for k, diff in s["pruned_minus_fewer"].items():
        cost = s["pruned_minus_fewer_computed"][k]
        lines.append(f"| n = {k} | {diff['mean']:+.4f} ± {diff['ci95']:.4f} | "
                     f"{cost['mean']:+.1f} ± {cost['ci95']:.1f} |")
    return "\n".join(lines + _pass_lines(s) + also_lines(s))


def _pass_lines(s: dict[str, Any]) -> list[str]:
    if "pass_reward" not in s:
        return []
    lines = ["", f"Pass rate (the chance the selection's reward is at least "
             f"{s['pass_reward']:g}):", "", "| selection | pass rate ± 95 % |", "|---|---|"]
    lines += [f"| {row['label']} | {row['pass_rate']['mean']:.4f} ± "
              f"{row['pass_rate']['ci95']:.4f} |" for row in s["curve"]]
    lines += ["", "| pruned minus unpruned with fewer candidates (paired) | pass rate "
              "difference ± 95 % |", "|---|---|"]
    lines += [f"| n = {k} | {d['mean']:+.4f} ± {d['ci95']:.4f} |"
              for k, d in s["pruned_minus_fewer_pass"].items()]
    return lines


def reward_vs_tokens_chart(report: PruneEvalReport, path: Path) -> Path:
    """Expected reward against computed tokens per request (the cost axis), with 95 %
    intervals: unpruned soft best-of-n at growing n (the "fewer candidates" curve) and the
    pruned rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.summary()["curve"]
    panels = [("reward", "expected reward of the selection")]
    if report.settings.pass_reward is not None:
        panels.append(("pass_rate", "pass rate of the selection"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        _cost_panel(axis, curve, key)
        axis.set_xlabel("computed tokens per request (decoded + prefilled, generation and "
                        "reward)", fontsize=8)
        axis.set_ylabel(label)
    s = report.settings
    fig.suptitle(f"{'reward' if len(panels) == 1 else 'reward and pass rate'} vs computed "
                 f"tokens: lambda={s.lam:g}, {len(report.outcomes)} prompts, 95 % intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost_panel(axis: Any, curve: list[dict[str, Any]], key: str) -> None:
    """One quantity against computed tokens: the fewer-candidates curve and the pruned point."""
    unpruned = [row for row in curve if row["label"].startswith("unpruned")]
    pruned = [row for row in curve if row["label"].startswith("pruned")]
    groups = [(unpruned, "o-", "unpruned, n = 1, 2, 4, ...", -10), (pruned, "s", "pruned", 6)]
    groups += [([row], marker, row["kind"], 6) for row, marker in zip(
        [row for row in curve if "kind" in row], ("^", "D", "v", "P"), strict=False)]
    # Labels below the curve's points and above the others: they often sit close.
    for rows, style, name, offset in groups:
        axis.errorbar([r["computed_tokens"]["mean"] for r in rows],
                      [r[key]["mean"] for r in rows], yerr=[r[key]["ci95"] for r in rows],
                      xerr=[r["computed_tokens"]["ci95"] for r in rows], fmt=style,
                      capsize=3, label=name)
        for r in rows:
            axis.annotate(r["label"], (r["computed_tokens"]["mean"], r[key]["mean"]),
                          fontsize=7, xytext=(4, offset), textcoords="offset points")
    axis.legend(fontsize=8)
