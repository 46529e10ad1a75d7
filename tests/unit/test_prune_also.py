"""Blockwise and particles beside the pruning measurement of ``sbon eval`` (bench/prune_also.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from fakes import FakeScorer, SampleByIndex, fake_runtime, mean_id

from bench.promptset import PromptItem
from bench.prune_also import (
    AlsoOutcome,
    also_rows,
    method_params,
    paired_difference,
    parse_also,
)
from bench.prune_eval import (
    PruneEvalSettings,
    markdown_summary,
    mean_ci,
    reward_vs_tokens_chart,
    run_prune_eval,
)
from common.prune import PruneSettings

PROMPTS = [PromptItem(f"p{i}", f"prompt number {i}") for i in range(3)]


def stat(values: Sequence[float]) -> dict[str, float]:
    mean, half = mean_ci(values)
    return {"mean": mean, "ci95": half}


def test_also_runs_blockwise_and_particles_on_every_prompt(tmp_path: Path) -> None:
    runtime = fake_runtime(SampleByIndex(), {"r": FakeScorer(fn=mean_id)})
    settings = PruneEvalSettings(prune=PruneSettings(mode="rank", every=4, keep=0.5), n=8,
                                 lam=0.05, max_tokens=16, prompts=3, pass_reward=160.0,
                                 also=("blockwise", "particles"), block_size=4)
    report = asyncio.run(run_prune_eval(runtime, PROMPTS, settings))
    for outcome in report.outcomes:
        assert set(outcome.also) == {"blockwise", "particles"}
        for method in outcome.also.values():
            # 4 blocks of 4 tokens for 8 candidates (particles) or 8 per block (blockwise).
            assert method.decoded == 8 * 16 and method.computed > method.decoded
            assert method.passed == float(method.reward >= 160.0)
    summary = report.summary()
    labels = [row["label"] for row in summary["curve"]]
    assert labels[-2:] == ["blockwise n=8 (B=4)", "particles n=8 (B=4)"]
    assert all("pass_rate" in row for row in summary["curve"])
    assert set(summary["particles_minus_blockwise"]) == {"reward", "computed_tokens",
                                                          "pass_rate"}
    text = markdown_summary(report)
    assert "particles minus blockwise" in text and "| blockwise n=8 (B=4) |" in text
    assert reward_vs_tokens_chart(report, tmp_path / "chart.png").stat().st_size > 1000


def test_the_reward_of_an_also_row_is_the_returned_response_s() -> None:
    runtime = fake_runtime(SampleByIndex(), {"r": FakeScorer(fn=mean_id)})
    settings = PruneEvalSettings(prune=PruneSettings(mode="rank", every=4, keep=0.5), n=4,
                                 lam=0.05, max_tokens=8, prompts=2, also=("blockwise",),
                                 block_size=4)
    report = asyncio.run(run_prune_eval(runtime, PROMPTS, settings))
    for index, (item, outcome) in enumerate(zip(PROMPTS, report.outcomes, strict=False)):
        params = method_params("blockwise", 4, 0.05, None, 4)
        again = asyncio.run(runtime.sbon.run(item.prompt, params, settings.sampling(index), "x"))
        assert outcome.also["blockwise"].reward == pytest.approx(mean_id(again.text))
        assert outcome.also["blockwise"].computed == again.tokens_computed
        assert outcome.also["blockwise"].passed is None  # no --pass-reward
    # With one method there is no paired comparison.
    assert report.summary()["particles_minus_blockwise"] == {}


def test_rows_and_the_paired_difference_aggregate_over_prompts() -> None:
    outcomes = [{"blockwise": AlsoOutcome(0.5, 100, 50, 0.0),
                 "particles": AlsoOutcome(1.0, 130, 60, 1.0)},
                {"blockwise": AlsoOutcome(1.0, 200, 70, 1.0),
                 "particles": AlsoOutcome(0.75, 170, 60, 0.0)}]
    rows = also_rows(outcomes, ("blockwise", "particles"), 8, 16, stat)
    assert [row["label"] for row in rows] == ["blockwise n=8 (B=16)", "particles n=8 (B=16)"]
    assert rows[0]["reward"]["mean"] == pytest.approx(0.75)
    assert rows[0]["computed_tokens"]["mean"] == pytest.approx(150.0)
    assert rows[0]["computed_tokens"]["ci95"] == pytest.approx(1.959964 * 50)
    assert rows[1]["pass_rate"]["mean"] == pytest.approx(0.5)
    assert rows[1]["decoded_tokens"] == {"mean": 60.0, "ci95": 0.0}
    diff = paired_difference(outcomes, stat)
    assert diff["reward"]["mean"] == pytest.approx((0.5 - 0.25) / 2)
    assert diff["computed_tokens"]["mean"] == pytest.approx(0.0)
    assert diff["computed_tokens"]["ci95"] == pytest.approx(1.959964 * 30)
    assert diff["pass_rate"]["mean"] == pytest.approx(0.0)
    no_pass = [{k: AlsoOutcome(v.reward, v.computed, v.decoded) for k, v in o.items()}
               for o in outcomes]
    assert "pass_rate" not in also_rows(no_pass, ("particles",), 8, 16, stat)[0]
    assert set(paired_difference(no_pass, stat)) == {"reward", "computed_tokens"}


def test_also_names_known_methods_once() -> None:
    assert parse_also(None) == ()
    assert parse_also("particles, blockwise") == ("particles", "blockwise")
    for bad in ("", "plain", "blockwise,", "blockwise,blockwise", "beam"):
        with pytest.raises(ValueError, match="--also"):
            parse_also(bad)


@pytest.mark.parametrize("flags", [["--also", "beam"], ["--also", ""],
                                   ["--also", "particles", "--also-block-size", "0"],
                                   ["--also", "particles", "--also-block-size", "65"],
                                   ["--also-block-size", "-3"]])
def test_bad_also_values_exit_2_before_anything_starts(
        flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    code = main(["eval", "--prune-mode", "rank", "--prompts", "1", "--max-tokens", "64",
                 "--out", "/nonexistent/never-written", *flags])
    assert code == 2
    assert "--also" in capsys.readouterr().err


def test_also_without_prune_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["eval", "--also", "particles", "--prompts", "1",
                 "--out", "/nonexistent/never-written"]) == 2
    assert "--also needs --prune-mode" in capsys.readouterr().err
