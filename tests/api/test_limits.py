"""Bounded work per request: counts, characters, the body, and admission by candidates.

Each refusal is checked for its status, OpenAI's error envelope and the parameter it names,
and the server is checked to still serve afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import pytest
from api_harness import Served
from fakes import FakeBackend
from lifecycle_harness import wait_until

from common.prompts import Prompt

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PROMPT = {"model": "fake-model", "prompt": "hello", "max_tokens": 4}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def still_serves(served: Any) -> None:
    assert served.post("/v1/chat/completions", CHAT).status_code == 200


@pytest.mark.parametrize(("path", "change", "param"), [
    ("/v1/completions", {"prompt": ["a"] * 5}, "prompt"),  # limits.max_prompts = 4
    ("/v1/completions", {"prompt": ["a"] * 3, "n": 3}, "n"),  # 9 choices > 8
    ("/v1/completions", {"prompt": "x" * 201}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "x" * 201]}, "prompt.1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 201}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 150}] * 2},
     "messages"),  # 300 characters in all
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 7}, "messages"),
    ("/v1/chat/completions", {"stop": ["a", "b", "c"]}, "stop"),
    ("/v1/chat/completions", {"stop": "s" * 11}, "stop"),
    ("/v1/chat/completions", {"n": 2, "sbon": {"n": 10}}, "sbon.n"),  # 20 candidates > 16
])
def test_limits_are_400_naming_the_parameter(server_factory, path: str, change: dict,
                                             param: str) -> None:
    served = server_factory(limits={
        "max_prompts": 4, "max_total_choices": 8, "max_prompt_chars": 200, "max_messages": 6,
        "max_stop_sequences": 2, "max_stop_chars": 10, "max_candidates_in_flight": 16})
    base = PROMPT if path == "/v1/completions" else CHAT
    error = error_of(served.post(path, {**base, **change}), 400)
    assert error["param"] == param and error["code"] == "limit_exceeded"
    assert error["type"] == "invalid_request_error"
    assert served.backend.calls == []  # refused before any generation
    still_serves(served)


@pytest.mark.parametrize(("change", "param"), [
    ({"model": "m" * 300}, "model"),
    ({"user": "u" * 300}, "user"),
    ({"messages": [{"role": "user", "content": "hi", "name": "n" * 300}]}, "messages.0.name"),
])
def test_identifier_fields_are_bounded(served: Served, change: dict, param: str) -> None:
    error = error_of(served.post("/v1/chat/completions", {**CHAT, **change}), 400)
    assert error["param"] == param
    still_serves(served)


@pytest.mark.parametrize(("path", "raw"), [
    ("/v1/completions", '{"model": "fake-model", "prompt": "a\\ud800b"}'),
    ("/v1/completions", '{"model": "fake-model", "prompt": ["ok", "\\udfff"]}'),
    ("/v1/chat/completions",
     '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", '
     '"content": [{"type": "text", "text": "\\ud83d"}]}]}'),
    ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", '
     '"content": "hi"}], "stop": "\\ud800"}'),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": []}'),
    ("/v1/completions", '{"model": "fake-model", "prompt": "a", "\\ud800": 1}'),
])
def test_lone_surrogates_are_400_not_500(served: Served, path: str, raw: str) -> None:
    response = httpx.post(f"{served.url}{path}", content=raw.encode(),
                          headers={"content-type": "application/json"}, timeout=10)
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    error["message"].encode("utf-8")  # the error itself is valid text
    still_serves(served)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server_factory) -> None:
    served = server_factory(limits={"max_body_bytes": 4096})
    big = {**PROMPT, "prompt": "w " * 4000}
    error = error_of(served.post("/v1/completions", big), 413)
    assert error["code"] == "body_too_large" and "4096" in error["message"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(20):
            yield b" " * 1000

    response = httpx.post(f"{served.url}/v1/completions", content=chunks(), timeout=10,
                          headers={"content-type": "application/json"})
    assert error_of(response, 413)["code"] == "body_too_large"
    assert served.backend.calls == []
    still_serves(served)


def test_a_declared_oversized_body_is_refused_without_reading_it(server_factory) -> None:
    served = server_factory(limits={"max_body_bytes": 4096})
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
        started = time.monotonic()
        reply = sock.recv(65536).decode()  # no body sent: a reader would wait forever
    assert reply.startswith("HTTP/1.1 413") and time.monotonic() - started < 2
    still_serves(served)


class SlowTokenizer(FakeBackend):
    """Tokenising takes a blocking second: it must not hold up the event loop."""

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        time.sleep(1.0)
        return super().encode_prompt(prompt)


def test_tokenising_runs_off_the_event_loop(server_factory) -> None:
    served = server_factory(backend=SlowTokenizer(model_name="fake-model"))
    worker = threading.Thread(target=served.post, args=("/v1/chat/completions", CHAT))
    worker.start()
    time.sleep(0.2)  # the request is being tokenised now
    started = time.monotonic()
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5
    worker.join()


def test_admission_counts_candidates_and_429_carries_retry_after(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=1.0)
    served = server_factory(backend=backend, limits={
        "max_candidates": 8, "max_candidates_in_flight": 8, "max_concurrent_requests": 16})
    big = {**CHAT, "sbon": {"n": 8}}
    worker = threading.Thread(target=served.post, args=("/v1/chat/completions", big))
    worker.start()
    assert wait_until(lambda: served.state.admission.candidates == 8)
    response = served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}})
    error = error_of(response, 429)
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    worker.join()
    # Small requests share the same budget: four of two candidates fit, a fifth does not.
    smalls = [threading.Thread(target=served.post,
                               args=("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}}))
              for _ in range(4)]
    for thread in smalls:
        thread.start()
    assert wait_until(lambda: served.state.admission.candidates == 8)
    assert error_of(served.post("/v1/chat/completions", big), 429)["code"]
    for thread in smalls:
        thread.join()
    assert served.state.admission.candidates == 0 and served.state.admission.in_flight == 0
    still_serves(served)


def test_a_body_that_trickles_in_gets_a_408_and_the_server_goes_on(server_factory) -> None:
    served = server_factory(limits={"body_timeout_s": 0.5})
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod")
        started = time.monotonic()
        reply = sock.recv(65536).decode()  # the rest of the body never comes
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - started < 3
    assert '"code":"body_timeout"' in reply.replace(" ", "")
    assert served.backend.calls == []
    still_serves(served)
