"""Deadlines: the whole request, slow streaming readers and hanging rewards all end, with
the client told why, the engine requests aborted and the admission slot given back."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from fakes import FakeBackend, FakeScorer
from lifecycle_harness import wait_until
from test_limits import CHAT, error_of, still_serves

from common.prompts import Prompt
from engine.guarded import GuardedScorer
from engine.types import Candidate, SamplingSettings

SLOW_BLOCKWISE = {**CHAT, "max_tokens": 40, "sbon": {"n": 2, "block_size": 2}}  # 20 blocks


def settled(served: Any) -> bool:
    return served.state.admission.in_flight == 0 and served.backend.num_unfinished_requests() == 0


def test_a_request_past_its_deadline_is_504_and_its_work_stops(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.3)
    served = server_factory(backend=backend, limits={"request_timeout_s": 1.0})
    started = time.monotonic()
    error = error_of(served.post("/v1/chat/completions", SLOW_BLOCKWISE), 504)
    assert time.monotonic() - started < 3
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert wait_until(lambda: settled(served))
    calls = len(backend.calls)
    time.sleep(0.7)
    assert len(backend.calls) == calls < 20  # nothing more was generated
    backend.delay_s = 0.0
    still_serves(served)


def test_a_stream_past_its_deadline_ends_with_an_error_frame_then_done(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.3)
    served = server_factory(backend=backend, limits={"request_timeout_s": 1.0})
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=10,
                      json={**SLOW_BLOCKWISE, "stream": True}) as response:
        assert response.status_code == 200
        frames = [line[len("data: "):] for line in response.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert any("choices" in json.loads(f) for f in frames[:-2])  # it had started
    assert wait_until(lambda: settled(served))
    backend.delay_s = 0.0
    still_serves(served)


class EndlessStream(FakeBackend):
    """Plain decoding that never ends on its own, in large pieces (fills socket buffers)."""

    async def generate_stream(self, prompt_token_ids: Sequence[int],
                              sampling: SamplingSettings, max_tokens: int, request_id: str,
                              seed: int | None) -> AsyncIterator[str | Candidate]:
        self.running.add(request_id)
        try:
            while True:
                yield "x" * 65536
                await asyncio.sleep(0)
        finally:
            self.running.discard(request_id)


def test_a_streaming_client_that_stops_reading_is_cut_off(server_factory, caplog) -> None:
    backend = EndlessStream(model_name="fake-model")
    served = server_factory(backend=backend, limits={"send_timeout_s": 0.5},
                            sbon={"enabled": False})
    port = int(served.url.rsplit(":", 1)[1])
    body = json.dumps({**CHAT, "max_tokens": 1000, "stream": True}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_until(lambda: backend.num_unfinished_requests() == 1)
        # Connected, but reading nothing: the server must give up on its own.
        assert wait_until(lambda: settled(served), timeout=15)
    assert any("stopped reading" in r.getMessage() for r in caplog.records)
    backend.__class__ = FakeBackend  # back to finite generation
    still_serves(served)


class Hanging(FakeScorer):
    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        await asyncio.Event().wait()
        return []


def test_a_hanging_reward_times_out_as_a_503_naming_it(server_factory) -> None:
    hanging = GuardedScorer(Hanging(name="fake"), timeout_s=0.5)
    served = server_factory(scorers={"fake": hanging, "other": FakeScorer(fn=len)})
    error = error_of(served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}}), 503)
    assert error["code"] == "reward_timeout" and error["param"] == "sbon.reward"
    assert "'fake'" in error["message"]
    stream = httpx.post(f"{served.url}/v1/chat/completions", timeout=10,
                        json={**CHAT, "stream": True, "sbon": {"n": 2}})
    frames = [line[len("data: "):] for line in stream.text.splitlines() if line]
    assert frames[-1] == "[DONE]" and json.loads(frames[-2])["error"]["code"] == "reward_timeout"
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "degraded"
    assert health["rewards"]["fake"]["state"] == "failing"
    assert health["rewards"]["fake"]["last_failure"] == "timeout"
    assert health["rewards"]["other"]["state"] == "ok"
    assert wait_until(lambda: settled(served))
    ok = served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2, "reward": "other"}})
    assert ok.status_code == 200
