"""Engine faults: a dead engine answers everyone with 503 and makes the process exit; an
engine error inside a reward (the judge) is the engine's 503, not a 500."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from typing import Any

import httpx
from fakes import FakeScorer
from lifecycle_harness import CHAT, GatedBackend, app_factory, wait_until
from test_limits import error_of

from common.prompts import Prompt
from engine.backend import BackendError
from engine.types import Candidate, SamplingSettings

__all__ = ["app_factory"]


class DyingBackend(GatedBackend):
    """An engine that can die: generation then fails, and ``ready`` turns false."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dead = False

    @property
    def ready(self) -> bool:
        return not self.dead

    def die(self) -> None:
        self.dead = True

    async def generate(self, prompt_token_ids: Sequence[int], n: int,
                       sampling: SamplingSettings, max_tokens: int, request_id: str,
                       seed: int | None) -> list[Candidate]:
        self.running.add(request_id)
        try:
            while not self.dead:  # a request stuck in an engine that then dies
                await asyncio.sleep(0.01)
        finally:
            self.running.discard(request_id)
        raise BackendError("the engine core process died")


def test_a_dead_engine_answers_in_flight_requests_with_503_then_exits(app_factory) -> None:
    backend = DyingBackend(model_name="fake-model")
    live = app_factory(backend=backend, server={"engine_check_s": 0.1})
    results: list[httpx.Response] = []
    frames: list[str] = []

    def plain() -> None:
        results.append(live.post("/v1/chat/completions", CHAT))

    def stream() -> None:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "stream": True}) as response:
            frames.extend(ln[len("data: "):] for ln in response.iter_lines() if ln)

    workers = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for worker in workers:
        worker.start()
    assert wait_until(lambda: live.state.admission.in_flight == 2)
    backend.die()
    for worker in workers:
        worker.join(timeout=20)
    assert error_of(results[0], 503)["type"] == "service_unavailable_error"
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["error"]["type"] == "service_unavailable_error"
    assert live.fatal.wait(timeout=10), "the server did not ask to exit"
    assert error_of(live.health(), 503)["code"] == "engine_dead"
    assert error_of(live.post("/v1/chat/completions", CHAT), 503)["code"] == "engine_dead"


class EngineBackedJudge(FakeScorer):
    """A reward that asks the engine, as the judge does, and meets an engine error."""

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise BackendError("generation failed: EngineDeadError")


def test_an_engine_error_inside_a_reward_is_503_engine_unavailable(app_factory) -> None:
    backend = GatedBackend(model_name="fake-model")
    backend.release.set()
    live = app_factory(backend=backend,
                       scorers={"fake": EngineBackedJudge(), "other": FakeScorer(fn=len)})
    error = error_of(live.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}}), 503)
    assert error["code"] == "engine_unavailable"
    health = live.health().json()
    assert health["rewards"]["fake"]["state"] == "ok"  # the engine's fault, not the reward's
    assert live.post("/v1/chat/completions",
                     {**CHAT, "sbon": {"n": 2, "reward": "other"}}).status_code == 200
