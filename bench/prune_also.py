"""``sbon eval --prune-mode ... --also blockwise,particles``: more methods on the cost chart.

Per prompt, each method runs one request at the eval's n, lambda, seed and max tokens with
blocks of ``block_size`` tokens, from an empty prefix cache like the eval's own requests, so
that computed tokens count alike. Its reward is the returned response's, scored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.types import SamplingSettings, SBoNParams, SBoNResult
from reward.base import BlockQuery, score_block

ALSO_METHODS = ("blockwise", "particles")
MAX_BLOCK_SIZE = 4096

Stat = Callable[[Sequence[float]], dict[str, float]]


def parse_also(text: str | None) -> tuple[str, ...]:
    """The comma-separated ``--also`` methods, in the order given, each once."""
    if text is None:
        return ()
    names = [name.strip() for name in text.split(",")]
    if not all(names) or any(name not in ALSO_METHODS for name in names):
        raise ValueError(f"--also takes a comma-separated list of {', '.join(ALSO_METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError("--also names a method twice")
    return tuple(names)


def check_block_size(block_size: int, max_tokens: int) -> None:
    if not 1 <= block_size <= min(MAX_BLOCK_SIZE, max_tokens):
        raise ValueError(f"--also-block-size must be between 1 and "
                         f"{min(MAX_BLOCK_SIZE, max_tokens)} (--max-tokens)")


@dataclass(frozen=True)
class AlsoOutcome:
    """One method's request on one prompt."""

    reward: float  # the returned response's reward
    computed: int  # tokens_computed of the request
    decoded: int  # tokens decoded across every candidate or particle
    passed: float | None = None  # 1.0 when the reward reaches ``pass_reward``


def method_params(method: str, n: int, lam: float, reward: str | None,
                  block_size: int) -> SBoNParams:
    return SBoNParams(n=n, lam=lam, reward=reward, block_size=block_size,
                      particles=method == "particles")


async def response_reward(runtime: Any, result: SBoNResult, prompt: Any, prompt_ids: Any,
                          reward: str | None) -> float:
    """The reward of the response a request returned (outside its computed tokens)."""
    key, _ = runtime.sbon.scorer_for(reward)
    scores = await score_block(runtime.sbon.scorers[key], BlockQuery(
        prompt=prompt, prompt_ids=prompt_ids, prefix_text="", prefix_ids=[],
        block_texts=[result.text], block_ids=[result.token_ids]))
    return float(scores.rewards[0])


async def run_method(runtime: Any, prompt: Any, params: SBoNParams, sampling: SamplingSettings,
                     request_id: str, pass_reward: float | None) -> AlsoOutcome:
    """One request of ``params`` from an empty prefix cache, and its response's reward."""
    await reset_prefix_cache(runtime)
    result = await runtime.sbon.run(prompt, params, sampling, request_id)
    prompt_ids = runtime.backend.encode_prompt(prompt)
    reward = await response_reward(runtime, result, prompt, prompt_ids, params.reward)
    passed = None if pass_reward is None else float(reward >= pass_reward)
    return AlsoOutcome(reward, result.tokens_computed, result.tokens_generated, passed)


async def reset_prefix_cache(runtime: Any) -> None:
    """Empty the policy's and every model reward's prefix cache (those that have one)."""
    for part in (runtime.backend, *getattr(runtime, "scorers", {}).values()):
        reset = getattr(part, "reset_prefix_cache", None)
        if reset is not None:
            await reset()


def also_rows(outcomes: Sequence[dict[str, AlsoOutcome]], methods: Sequence[str], n: int,
              block_size: int, stat: Stat) -> list[dict[str, Any]]:
    """Chart and table rows of each method over prompts, like the eval's curve rows."""
    rows = []
    for method in methods:
        mine = [o[method] for o in outcomes]
        row: dict[str, Any] = {
            "label": f"{method} n={n} (B={block_size})", "kind": method, "n": n,
            "reward": stat([x.reward for x in mine]),
            "decoded_tokens": stat([float(x.decoded) for x in mine]),
            "computed_tokens": stat([float(x.computed) for x in mine])}
        if all(x.passed is not None for x in mine):
            row["pass_rate"] = stat([x.passed or 0.0 for x in mine])
        rows.append(row)
    return rows


def paired_difference(outcomes: Sequence[dict[str, AlsoOutcome]], stat: Stat,
                      first: str = "particles", second: str = "blockwise"
                      ) -> dict[str, dict[str, float]]:
    """``first`` minus ``second``, paired by prompt: reward, pass rate, computed tokens."""
    pairs = [(o[first], o[second]) for o in outcomes if first in o and second in o]
    if not pairs:
        return {}
    out = {"reward": stat([a.reward - b.reward for a, b in pairs]),
           "computed_tokens": stat([float(a.computed - b.computed) for a, b in pairs])}
    if all(a.passed is not None and b.passed is not None for a, b in pairs):
        out["pass_rate"] = stat([(a.passed or 0.0) - (b.passed or 0.0) for a, b in pairs])
    return out


def also_lines(summary: dict[str, Any]) -> list[str]:
    """The Markdown note on the extra rows and the paired comparison."""
    if not summary.get("also"):
        return []
    lines = ["", f"{' and '.join(summary['also'])}: one request per prompt from an empty "
             "prefix cache; reward and pass rate are the returned response's (one draw, not "
             "the expectation over a selection as in the other rows), computed tokens measured."]
    diff = summary.get("particles_minus_blockwise") or {}
    if diff:
        lines += ["", "| particles minus blockwise (paired by prompt) | mean ± 95 % |",
                  "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {d['mean']:+.{1 if 'tokens' in name else 4}f}"
                  f" ± {d['ci95']:.{1 if 'tokens' in name else 4}f} |"
                  for name, d in diff.items()]
    return lines
