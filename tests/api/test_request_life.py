"""A request's life from admission to its end, and the reward health operations act on.

A full server refuses before tokenising; a dead default reward turns /health to 503 and,
when its engine or worker died, ends the process like a dead generator does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from fakes import FakeScorer
from lifecycle_harness import CHAT, GatedBackend, app_factory, wait_until
from test_limits import error_of

from common.prompts import Prompt
from reward.base import RewardError

__all__ = ["app_factory"]


class CountingBackend(GatedBackend):
    """A held engine that counts how many prompts it was asked to tokenise."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoded = 0

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        self.encoded += 1
        return super().encode_prompt(prompt)


def test_a_full_server_refuses_before_tokenising(app_factory) -> None:
    backend = CountingBackend(model_name="fake-model")
    live = app_factory(backend=backend, limits={"max_concurrent_requests": 1})
    held: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: held.append(live.post("/v1/chat/completions",
                                                                   CHAT)))
    worker.start()
    try:
        assert wait_until(lambda: live.state.admission.in_flight == 1)
        assert wait_until(lambda: backend.encoded == 1)
        refused = [live.post("/v1/chat/completions", CHAT) for _ in range(3)]
        assert all(error_of(r, 429)["code"] == "rate_limit_exceeded" for r in refused)
        assert backend.encoded == 1  # none of the refused prompts was tokenised
    finally:
        backend.release.set()
        worker.join(timeout=20)
    assert held[0].status_code == 200


def test_a_dead_default_reward_is_503_on_health_and_ends_the_process(app_factory) -> None:
    scorer = FakeScorer(fn=len)
    live = app_factory(scorers={"fake": scorer, "other": FakeScorer(fn=len)},
                       server={"engine_check_s": 0.2})
    assert live.health().json()["rewards"]["fake"]["state"] == "ok"
    scorer.alive = False  # its engine or worker died
    health = live.health()
    assert error_of_health(health)["code"] == "reward_dead"
    assert health.json()["rewards"]["fake"]["state"] == "dead"
    assert live.fatal.wait(5), "the process was not told to exit"
    late = live.post("/v1/chat/completions", CHAT)
    assert error_of(late, 503)["code"] in ("reward_dead", "server_shutting_down")


def test_a_dead_reward_that_is_not_the_default_ends_the_process_too(app_factory) -> None:
    other = FakeScorer(fn=len)
    live = app_factory(scorers={"fake": FakeScorer(fn=len), "other": other},
                       server={"engine_check_s": 0.2})
    other.alive = False
    assert live.fatal.wait(5)


class Failing(FakeScorer):
    async def score(self, prompts: Any, responses: Any) -> list[float]:
        raise RewardError("model error")


def test_consecutive_failures_of_the_default_reward_turn_health_to_503(app_factory) -> None:
    live = app_factory(scorers={"fake": Failing(), "other": FakeScorer(fn=len)},
                       server={"reward_dead_after_failures": 3, "engine_check_s": 0.2})
    body = {**CHAT, "sbon": {"n": 2}}
    for expected in (200, 200, 503):
        assert error_of(live.post("/v1/chat/completions", body), 503)
        health = live.health()
        assert health.status_code == expected, health.text
    assert health.json()["rewards"]["fake"]["consecutive_failures"] == 3
    time.sleep(0.5)
    assert not live.fatal.is_set()  # failures alone do not restart: a probe decides


def error_of_health(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_requests_in_flight_get_the_reward_death_as_503(app_factory) -> None:
    backend = GatedBackend(model_name="fake-model")
    scorer = FakeScorer(fn=len)
    live = app_factory(backend=backend, scorers={"fake": scorer, "other": FakeScorer(fn=len)},
                       server={"engine_check_s": 0.2})
    results: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: results.append(
        live.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}})))
    worker.start()
    assert wait_until(lambda: live.state.admission.in_flight == 1)
    scorer.alive = False
    worker.join(timeout=20)
    assert error_of(results[0], 503)["code"] == "reward_dead"
    assert backend.num_unfinished_requests() == 0
