"""``sbon bench`` logic over fakes: every method runs, and the figures are consistent."""

from __future__ import annotations

import json
import math

import pytest
from fakes import FakeBackend, FakeScorer, fake_runtime

from bench.bench import (
    NAIVE,
    PER_RESPONSE,
    PLAIN,
    BenchSettings,
    InProcessTarget,
    percentile,
    render_table,
    run_bench,
)
from bench.plots import bench_chart
from bench.promptset import load_prompts

SETTINGS = BenchSettings(n=3, max_tokens=8, block_sizes=(4,), concurrency=(1, 2), prompts=2)


async def measured(settings: BenchSettings = SETTINGS, **backend_args):  # type: ignore[no-untyped-def]
    runtime = fake_runtime(FakeBackend(delay_s=0.01, **backend_args), {"fake": FakeScorer()})
    target = InProcessTarget(runtime, load_prompts(None, settings.prompts), settings)
    ticks: list[int] = []
    report = await run_bench(target, settings, ticks.append)
    return report, runtime, ticks


async def test_every_method_runs_at_every_level_on_the_same_prompts() -> None:
    report, runtime, ticks = await measured()
    methods = [PLAIN, PER_RESPONSE, "blockwise-4", NAIVE]
    assert [(r.method, r.concurrency) for r in report.runs] == [
        (m, c) for c in (1, 2) for m in methods]
    assert sum(ticks) == 4 * (1 + 2 * 2)  # warm-ups, then every request
    for run in report.runs:
        assert len(run.samples) == 2 and run.wall_s > 0
        assert all(s.generated_tokens == 3 * 8 for s in run.samples)  # fakes fill max_tokens
        returned = 3 * 8 if run.method == PLAIN else 8
        assert all(s.returned_tokens == returned for s in run.samples)
    calls = runtime.backend.calls
    plain_calls = [c for c in calls if "-plain-" in c.request_id]
    assert all(c.n == 3 for c in plain_calls)
    naive_calls = [c for c in calls if "-naive-" in c.request_id]
    assert all(c.n == 1 for c in naive_calls)
    assert len(naive_calls) == 3 * (1 + 2 * 2)  # n per request: the warm-up, then 2 levels


async def test_ratios_are_the_quotients_of_the_measured_values() -> None:
    report, _, _ = await measured()
    ratios = report.ratios()
    assert len(ratios) == 3 * 2
    for ratio in ratios:
        run = next(r for r in report.runs if (r.method, r.concurrency)
                   == (ratio["method"], ratio["concurrency"]))
        base = report.baseline(run.concurrency)
        assert base is not None
        assert ratio["generated_tokens_per_s"] == pytest.approx(
            run.generated_tokens_per_s / base.generated_tokens_per_s)
        assert ratio["requests_per_s"] == pytest.approx(run.requests_per_s / base.requests_per_s)
        assert ratio["latency_p50"] == pytest.approx(run.latency(50) / base.latency(50))
    for run in report.runs:
        tokens = sum(s.generated_tokens for s in run.samples)
        assert run.generated_tokens_per_s == pytest.approx(tokens / run.wall_s)
        assert run.latency(50) <= run.latency(95)
        assert 0.0 <= run.scoring_share <= 1.0
        if run.method == PLAIN:
            assert run.scoring_share == 0.0


async def test_outputs_table_json_and_chart(tmp_path) -> None:
    report, _, _ = await measured()
    table = render_table(report).splitlines()
    # Header, one row per run, and the legend of the prefill columns.
    assert len(table) == 2 + len(report.runs) and "gen tok/s" in table[0]
    assert "gen pf/ca" in table[0] and "score pf/ca" in table[0]
    assert table[-1].startswith("gen/score pf/ca")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["settings"]["n"] == 3 and len(data["runs"]) == len(report.runs)
    path = bench_chart(report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_percentile_interpolates_like_numpy() -> None:
    import numpy as np

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 25, 50, 90, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


async def test_methods_draw_their_own_samples_from_an_empty_prefix_cache() -> None:
    class CountingBackend(FakeBackend):
        resets: int = 0

        async def reset_prefix_cache(self) -> bool:
            self.resets += 1
            return True

    backend = CountingBackend(delay_s=0.0)
    runtime = fake_runtime(backend, {"fake": FakeScorer()})
    target = InProcessTarget(runtime, load_prompts(None, 3), SETTINGS)
    report = await run_bench(target, SETTINGS)
    assert backend.resets == len(report.runs)  # one empty cache per timed method
    seeds: dict[str, set[int | None]] = {}
    for call in backend.calls:
        method = call.request_id.split("-")[1]
        seeds.setdefault(method, set()).add(call.seed)
    methods = list(seeds)
    for i, first in enumerate(methods):
        for second in methods[i + 1:]:
            assert not seeds[first] & seeds[second], (first, second)
    outside = target.prompt_ids[2]
    warm = {c.prompt_token_ids[:len(outside)] == outside for c in backend.calls
            if c.request_id.startswith("warm-")}
    assert warm == {True}  # warm-ups use a prompt outside the timed set
