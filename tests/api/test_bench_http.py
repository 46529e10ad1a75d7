"""``sbon bench --url``: the methods as OpenAI requests to the real app over a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fakes import FakeBackend, FakeRuntime, FakeScorer, fake_runtime

from bench.bench import NAIVE, PLAIN, BenchSettings, run_bench
from bench.http import HTTPTarget
from bench.promptset import load_prompts
from common.config import AppConfig

SETTINGS = BenchSettings(n=3, max_tokens=8, block_sizes=(4,), concurrency=(1, 2), prompts=2,
                         naive=True)


def app_config() -> AppConfig:
    return AppConfig.model_validate({
        "model": {"name": "fake-model"},
        "rewards": [{"name": "fake", "type": "python", "function": "reward.rules:brevity"}],
    })


async def served_client(runtime: FakeRuntime) -> AsyncIterator[httpx.AsyncClient]:
    from server.app import create_app

    async def start(config: AppConfig) -> Any:
        return runtime

    app = create_app(app_config(), start_runtime=start)
    async with app.router.lifespan_context(app):
        while app.state.sbon.runtime is None:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sbon") as client:
            yield client


async def test_the_server_is_measured_on_the_same_contract() -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.01)
    runtime = fake_runtime(backend, {"fake": FakeScorer()})
    async for client in served_client(runtime):
        target = await HTTPTarget.connect("http://sbon/", load_prompts(None, 2), SETTINGS,
                                          client)
        assert target.model == "fake-model" and not target.supports(NAIVE)
        report = await run_bench(target, SETTINGS)
    assert [(r.method, r.concurrency) for r in report.runs] == [
        (m, c) for c in (1, 2) for m in (PLAIN, "per-response", "blockwise-4")]
    for run in report.runs:
        # The fakes always fill max_tokens: plain returns n choices, soft best-of-n one.
        returned = 3 * 8 if run.method == PLAIN else 8
        assert all(s.returned_tokens == returned for s in run.samples)
        assert all(s.generated_tokens == 3 * 8 for s in run.samples)
        assert all(s.generation_s > 0 and s.latency_s >= s.generation_s for s in run.samples)
    plain = [c for c in backend.calls if c.request_id.startswith("bench-plain")]
    assert plain and all(c.n == 1 for c in plain)  # OpenAI n choices: one draw each
    blocks = [c for c in backend.calls if c.request_id.startswith("bench-blockwise-4")]
    assert blocks and all(c.n == 3 and c.max_tokens == 4 for c in blocks)
    for ratio in report.ratios():
        run = next(r for r in report.runs
                   if (r.method, r.concurrency) == (ratio["method"], ratio["concurrency"]))
        base = report.baseline(run.concurrency)
        assert base is not None
        assert ratio["requests_per_s"] == pytest.approx(run.requests_per_s / base.requests_per_s)
