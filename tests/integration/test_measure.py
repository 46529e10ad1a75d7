"""``sbon bench`` and ``sbon eval`` on the real engine and judge, on a tiny configuration."""

from __future__ import annotations

import math

import pytest

from bench.bench import PLAIN, BenchSettings, InProcessTarget, run_bench
from bench.evaluate import BLOCKWISE, EvalSettings, run_eval
from bench.promptset import load_prompts
from engine.selection import kl_bon_bound


async def test_bench_measures_every_method_on_the_engine(runtime) -> None:
    settings = BenchSettings(n=2, max_tokens=8, block_sizes=(4,), concurrency=(1,), prompts=2)
    target = InProcessTarget(runtime, load_prompts(None, 2), settings)
    report = await run_bench(target, settings)
    assert {r.method for r in report.runs} == set(settings.methods())
    base = report.baseline(1)
    assert base is not None and base.generated_tokens_per_s > 0
    for ratio in report.ratios():
        run = next(r for r in report.runs if r.method == ratio["method"])
        assert ratio["requests_per_s"] == pytest.approx(run.requests_per_s / base.requests_per_s)
    for run in report.runs:
        phases = run.phase_s()
        assert phases["generation"] > 0
        if run.method != PLAIN:
            assert phases["scoring"] > 0 and 0 < run.scoring_share < 1


async def test_eval_reports_reward_and_distortion_from_the_engine(runtime) -> None:
    settings = EvalSettings(n_grid=(1, 2), lam_grid=(1.0, math.inf), soft_n=2, block_sizes=(4,),
                            pool=4, draws=50, prompts=2, max_tokens=8)
    report = await run_eval(runtime, load_prompts(None, 2), settings)
    for row in report.rows():
        assert math.isfinite(row["reward"]) and math.isfinite(row["base_reward"])
        assert 0.0 <= row["win_rate"] <= 1.0
        assert row["kl_from_uniform"] >= 0.0 and row["kl_estimate"] >= 0.0
        if row["method"] != BLOCKWISE:
            assert row["kl_from_uniform"] <= math.log(row["n"]) + 1e-9
            assert row["kl_estimate"] <= kl_bon_bound(row["n"]) + 1e-9
