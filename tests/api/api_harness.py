"""A real uvicorn server in a thread, serving the real app over a fake engine and reward.

The app, routes, middleware, streaming and error handling are the production code; only
the generation backend and the reward scorer are the small fakes of ``tests/fakes.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fakes import FakeBackend, FakeRuntime, FakeScorer
from helpers import free_port

from common.config import AppConfig
from engine.sbon import SBoNEngine
from server.app import ServerState, create_app


@dataclass
class Served:
    """A running server: its URL, its state, and the fakes behind it."""

    url: str
    state: ServerState
    backend: FakeBackend
    scorers: dict[str, Any]
    runtimes: list[FakeRuntime] = field(default_factory=list)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             **kwargs)

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=30, **kwargs)


def make_config(**sections: Any) -> AppConfig:
    base: dict[str, Any] = {
        "model": {"name": "fake-model"},
        "rewards": [{"name": "fake", "type": "python", "function": "reward.rules:brevity"},
                    {"name": "other", "type": "python",
                     "function": "reward.rules:response_length"}],
        "sbon": {"n": 4, "lambda": 1.0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return AppConfig.model_validate(base)


def serve(config: AppConfig, backend: FakeBackend | None = None,
          scorers: dict[str, Any] | None = None,
          gate: threading.Event | None = None) -> Iterator[Served]:
    """Start the app on a free port; ``gate`` holds the engine start until it is set."""
    backend = backend or FakeBackend(model_name="fake-model")
    if scorers is None:
        scorers = {"fake": FakeScorer(fn=lambda r: -len(r)), "other": FakeScorer(fn=len)}
    runtimes: list[FakeRuntime] = []

    async def start(cfg: AppConfig) -> FakeRuntime:
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.01)
        for scorer in scorers.values():
            await scorer.start()
        runtime = FakeRuntime(SBoNEngine(backend, scorers, cfg.default_reward or "fake"),
                              backend)
        runtimes.append(runtime)
        return runtime

    app = create_app(config, start_runtime=start)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    served = Served(f"http://127.0.0.1:{port}", app.state.sbon, backend, scorers, runtimes)
    if gate is None:
        wait_ready(served)
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_ready(served: Served, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{served.url}/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server never became ready")
        time.sleep(0.01)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Served]]:
    """Start servers with given configuration sections and fakes; stopped after the test."""
    stack: list[Iterator[Served]] = []

    def start(backend: FakeBackend | None = None, scorers: dict[str, Any] | None = None,
              gate: threading.Event | None = None, **sections: Any) -> Served:
        generator = serve(make_config(**sections), backend, scorers, gate)
        stack.append(generator)
        return next(generator)

    yield start
    for generator in reversed(stack):
        for _ in generator:  # runs the generator's cleanup
            pass


@pytest.fixture
def served(server_factory: Callable[..., Served]) -> Served:
    """A ready server with the default test configuration."""
    return server_factory()
