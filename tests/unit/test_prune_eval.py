"""The pruning measurement of ``sbon eval`` (bench/prune_eval.py) over the fakes."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path

import pytest
from fakes import FakeScorer, SampleByIndex, fake_runtime, mean_id

from bench.promptset import PromptItem
from bench.prune_eval import (
    PruneEvalSettings,
    decoded_after_pruning,
    expected_pass,
    expected_reward,
    markdown_summary,
    reward_vs_tokens_chart,
    run_prune_eval,
    spearman,
)
from common.prune import PruneSettings
from engine.types import Candidate

PROMPTS = [PromptItem(f"p{i}", f"prompt number {i}") for i in range(5)]


def test_the_replay_is_exact_and_agrees_with_the_online_runs(tmp_path: Path) -> None:
    runtime = fake_runtime(SampleByIndex(), {"r": FakeScorer(fn=mean_id)})
    settings = PruneEvalSettings(prune=PruneSettings(mode="rank", every=4, keep=0.5), n=8,
                                 lam=0.05, max_tokens=16, prompts=5)
    report = asyncio.run(run_prune_eval(runtime, PROMPTS, settings))
    summary = report.summary()
    assert summary["online_agrees_with_replay"] == 5
    for outcome in report.outcomes:
        assert outcome.pruned == 7 and 0.0 <= outcome.tv <= 1.0
        assert outcome.decoded_unpruned == 8 * 16
        assert outcome.decoded_pruned == 16 + 4 * 4 + 2 * 8 + 12  # 8 -> 4 -> 2 -> 1
        assert outcome.computed_pruned < outcome.computed_unpruned
        assert set(outcome.correlations) == {4, 8, 12}
        # Fewer candidates cost less: at least the decoded tokens of those left out.
        costs = [outcome.fewer_computed[k] for k in (1, 2, 4)] + [outcome.computed_unpruned]
        steps = zip(costs[:-1], costs[1:], (1, 2, 4), strict=True)
        assert all(more - less >= 16 * k for less, more, k in steps)
    assert summary["decoded_saved"] == pytest.approx(1 - 60 / 128)
    labels = [row["label"] for row in summary["curve"]]
    assert labels == ["unpruned n=1", "unpruned n=2", "unpruned n=4", "unpruned n=8",
                      "pruned n=8 (rank)"]
    assert set(summary["pruned_minus_fewer_computed"]) == {"1", "2", "4"}
    text = markdown_summary(report)
    assert "TV(pruned, unpruned selection)" in text and "5 of 5" in text
    assert "computed tokens difference" in text
    assert reward_vs_tokens_chart(report, tmp_path / "chart.png").stat().st_size > 1000


def test_expected_reward_over_survivors_and_decoded_tokens() -> None:
    assert expected_reward([1.0, 0.0], math.inf) == 0.5
    assert expected_reward([1.0, 0.0, 3.0], 0.0, keep=[True, True, False]) == 1.0
    ids = (1, 2, 3, 4, 5)
    candidates = [Candidate(ids, "", None, "length"), Candidate(ids[:3], "", None, "stop")]
    assert decoded_after_pruning(candidates, [2, 4]) == 2 + 3
    assert decoded_after_pruning(candidates, [None, None]) == 8


def test_pass_rate_is_the_selection_weight_of_passing_candidates() -> None:
    assert expected_pass([1.0, 0.5, 1.0, 0.0], math.inf, 1.0) == 0.5
    assert expected_pass([1.0, 0.5], 0.0, 1.0) == 1.0 and expected_pass([1.0, 0.5], 0.0, 2) == 0
    assert expected_pass([1.0, 0.5], math.inf, 0.9, keep=[False, True]) == 0.0


def test_the_report_adds_pass_rates_and_a_second_panel(tmp_path: Path) -> None:
    runtime = fake_runtime(SampleByIndex(), {"r": FakeScorer(fn=mean_id)})
    settings = PruneEvalSettings(prune=PruneSettings(mode="rank", every=4, keep=0.5), n=8,
                                 lam=0.05, max_tokens=16, prompts=3, pass_reward=160.0)
    report = asyncio.run(run_prune_eval(runtime, PROMPTS, settings))
    summary = report.summary()
    for outcome in report.outcomes:
        assert outcome.pass_unpruned is not None and outcome.pass_pruned is not None
        assert 0.0 <= outcome.pass_pruned <= 1.0 and set(outcome.fewer_pass) == {1, 2, 4}
    # The fake rewards lie near 160: some candidates pass 160, some do not.
    assert 0.0 < statistics.fmean(o.pass_unpruned or 0.0 for o in report.outcomes) < 1.0
    assert all("pass_rate" in row for row in summary["curve"])
    assert set(summary["pruned_minus_fewer_pass"]) == {"1", "2", "4"}
    assert "Pass rate" in markdown_summary(report)
    wide = reward_vs_tokens_chart(report, tmp_path / "two.png")
    plain = PruneEvalSettings(prune=settings.prune, n=8, lam=0.05, max_tokens=16, prompts=3)
    narrow = reward_vs_tokens_chart(asyncio.run(run_prune_eval(runtime, PROMPTS, plain)),
                                    tmp_path / "one.png")
    assert wide.stat().st_size > narrow.stat().st_size


def test_spearman_matches_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_sbon_bench_times_the_pruned_method_and_its_computed_tokens() -> None:
    from bench.bench import PER_RESPONSE, PRUNED, BenchSettings, InProcessTarget, run_bench
    from bench.promptset import load_prompts

    settings = BenchSettings(n=8, max_tokens=16, block_sizes=(), concurrency=(2,), prompts=3,
                             naive=False, prune=PruneSettings(mode="rank", every=4))
    runtime = fake_runtime(SampleByIndex(), {"r": FakeScorer(fn=mean_id)})
    report = asyncio.run(run_bench(InProcessTarget(runtime, load_prompts(None, 3), settings),
                                   settings))
    runs = {r.method: r for r in report.runs}
    assert set(runs) == {"plain", PER_RESPONSE, PRUNED}
    full = runs[PER_RESPONSE]
    assert full.computed_tokens == pytest.approx(sum(
        s.generated_tokens + s.generation_computed + s.scoring_computed
        for s in full.samples) / 3)
    assert all(s.generated_tokens == 8 * 16 for s in full.samples)
    assert runs[PRUNED].computed_tokens < runs[PER_RESPONSE].computed_tokens
    written = json.loads(json.dumps(report.to_dict()))
    assert written["runs"][2]["computed_tokens_mean"] == runs[PRUNED].computed_tokens
    assert written["settings"]["prune"]["mode"] == "rank"


def test_the_prune_flags_of_sbon_generate_are_validated() -> None:
    from cli.main import _prune_settings, build_parser

    def settings(*flags: str) -> PruneSettings | None:
        args = build_parser().parse_args(["generate", "a prompt", *flags])
        result: PruneSettings | None = _prune_settings(args)
        return result

    assert settings() is None and settings("--prune-mode", "off") is None
    assert settings("--prune-mode", "rank", "--prune-keep", "0.25") == PruneSettings(
        mode="rank", keep=0.25)
    for bad in (["--prune-keep", "0.5"], ["--prune-mode", "bound", "--prune-keep", "0.5"],
                ["--prune-mode", "rank", "--prune-every", "0"]):
        with pytest.raises(ValueError):
            settings(*bad)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_pass_reward_must_be_finite(bad: str) -> None:
    from bench.prune_cli import prune_eval_command
    from cli.main import build_parser

    args = build_parser().parse_args(["eval", "--prune-mode", "rank", "--prompts", "1",
                                      f"--pass-reward={bad}"])

    def no_engine(_: object) -> object:
        raise AssertionError("the value is refused before anything starts")

    with pytest.raises(ValueError, match="--pass-reward"):
        prune_eval_command(args, no_engine)
