"""The production server object (``server.lifecycle.build_server``) in a thread, over fakes.

Unlike ``api_harness.serve``, this runs the draining uvicorn server the ``sbon serve``
command runs, and records the app's fatal callback, so that shutdown and engine-death
behaviour can be driven and observed from a test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from api_harness import make_config
from fakes import FakeBackend, FakeRuntime, FakeScorer
from helpers import free_port

from common.config import AppConfig
from engine.sbon import SBoNEngine
from engine.types import Candidate, SamplingSettings
from server.app import create_app
from server.lifecycle import DrainingServer, ServerState, build_server

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class LiveApp:
    """A running app: URL, state, fakes, the uvicorn server and its thread."""

    url: str
    state: ServerState
    backend: FakeBackend
    server: DrainingServer
    thread: threading.Thread
    fatal: threading.Event = field(default_factory=threading.Event)

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=30, **kwargs)

    def health(self, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """What SIGTERM does: uvicorn's graceful shutdown, with the app's drain."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def start_app(config: AppConfig, backend: FakeBackend | None = None,
              scorers: dict[str, Any] | None = None, ready: bool = True) -> LiveApp:
    backend = backend or FakeBackend(model_name="fake-model")
    scorers = scorers or {"fake": FakeScorer(fn=lambda r: -len(r)), "other": FakeScorer(fn=len)}

    async def start(cfg: AppConfig) -> FakeRuntime:
        return FakeRuntime(SBoNEngine(backend, scorers, cfg.default_reward or "fake"), backend)

    fatal = threading.Event()
    app = create_app(config, start_runtime=start, on_fatal=fatal.set)
    server = build_server(app, "127.0.0.1", free_port())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    live = LiveApp(f"http://127.0.0.1:{server.config.port}", app.state.sbon, backend, server,
                   thread, fatal)
    while ready and live.health().status_code != 200:
        assert time.monotonic() < deadline, "the test server never became ready"
        time.sleep(0.01)
    return live


@pytest.fixture
def app_factory() -> Iterator[Callable[..., LiveApp]]:
    """Start draining servers with configuration sections and fakes; stopped afterwards."""
    started: list[LiveApp] = []

    def start(backend: FakeBackend | None = None, scorers: dict[str, Any] | None = None,
              **sections: Any) -> LiveApp:
        live = start_app(make_config(**sections), backend, scorers)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


class GatedBackend(FakeBackend):
    """A fake engine whose generation waits for ``release`` (set it to let work finish)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    async def generate(self, prompt_token_ids: Sequence[int], n: int,
                       sampling: SamplingSettings, max_tokens: int, request_id: str,
                       seed: int | None) -> list[Candidate]:
        self.running.add(request_id)  # queued in the engine while it waits
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.running.discard(request_id)
        return await super().generate(prompt_token_ids, n, sampling, max_tokens, request_id,
                                      seed)
