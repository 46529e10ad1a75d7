"""Graceful shutdown: requests in flight finish within the drain time; past it, they end
with a 503 (an error frame and [DONE] for streams); nothing new is accepted meanwhile."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
from fakes import FakeBackend
from lifecycle_harness import CHAT, GatedBackend, app_factory, wait_until
from test_limits import error_of

__all__ = ["app_factory"]


def test_requests_in_flight_finish_during_the_drain(app_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=1.0)
    live = app_factory(backend=backend, server={"drain_s": 10})
    results: list[httpx.Response] = []
    workers = [threading.Thread(target=lambda: results.append(
        live.post("/v1/chat/completions", CHAT))) for _ in range(2)]
    for worker in workers:
        worker.start()
    assert wait_until(lambda: live.state.admission.in_flight == 2)
    stopper = threading.Thread(target=live.stop)
    stopper.start()
    assert wait_until(lambda: live.state.stopping)
    late = None
    with contextlib.suppress(httpx.TransportError):  # refused: a 503 or a closed listener
        late = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, timeout=5)
    assert late is None or error_of(late, 503)["code"] == "server_shutting_down"
    for worker in workers:
        worker.join(timeout=20)
    stopper.join(timeout=30)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["choices"][0]["message"]["content"] for r in results)
    assert not live.thread.is_alive()
    assert backend.num_unfinished_requests() == 0


def test_past_the_drain_time_requests_are_ended_with_an_error(app_factory) -> None:
    backend = GatedBackend(model_name="fake-model")  # never released: work that cannot end
    live = app_factory(backend=backend, server={"drain_s": 0.5})
    results: list[httpx.Response] = []
    frames: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "stream": True}) as response:
            frames.extend(ln[len("data: "):] for ln in response.iter_lines() if ln)

    workers = [threading.Thread(target=lambda: results.append(
        live.post("/v1/chat/completions", CHAT))), threading.Thread(target=stream)]
    for worker in workers:
        worker.start()
    assert wait_until(lambda: live.state.admission.in_flight == 2)
    started = time.monotonic()
    live.stop()
    for worker in workers:
        worker.join(timeout=20)
    assert time.monotonic() - started < 5
    assert error_of(results[0], 503)["code"] == "server_shutting_down"
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["error"]["code"] == "server_shutting_down"
    assert backend.num_unfinished_requests() == 0 and not live.thread.is_alive()
