"""Operations: metrics, request ids, logs without prompt text, disconnects abort the work."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
from api_harness import Served
from fakes import FakeBackend

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(\{{{re.escape(wanted)}\}})? (\S+)$" if wanted else \
        rf"^{re.escape(name)} (\S+)$"
    for line in text.splitlines():
        match = re.match(pattern, line)
        if match:
            return float(match.groups()[-1])
    return 0.0


def test_phase_histograms_and_counters_move_after_a_request(served: Served) -> None:
    before = httpx.get(f"{served.url}/metrics").text
    assert served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 3}}).status_code == 200
    after = httpx.get(f"{served.url}/metrics").text
    for phase in ("queue", "generation", "scoring", "selection", "total"):
        name = "sbon_phase_duration_seconds_count"
        assert metric(after, name, phase=phase) == metric(before, name, phase=phase) + 1, phase
    assert metric(after, "sbon_candidates_total") == metric(before, "sbon_candidates_total") + 3
    assert metric(after, "sbon_generated_tokens_total") >= 12
    assert metric(after, "sbon_chosen_reward_count", reward="fake") >= 1
    assert metric(after, "sbon_kl_from_uniform_nats_count") >= 1
    assert metric(after, "sbon_requests_total", endpoint="/v1/chat/completions",
                  status="200") >= 1
    assert "request_id" not in after and "hi" not in re.findall(r'"([^"]*)"', after)


def test_request_ids_are_honoured_or_made(served: Served) -> None:
    response = served.post("/v1/chat/completions", CHAT, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    made = served.post("/v1/chat/completions", CHAT).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert any(c.request_id.startswith("abc-123.") for c in served.backend.calls)
    odd = served.post("/v1/chat/completions", CHAT, headers={"X-Request-Id": "a b\tc"})
    assert odd.headers["x-request-id"] != "a b\tc"  # unsafe ids are replaced


def test_logs_carry_the_request_id_but_not_the_prompt(served: Served, caplog) -> None:
    secret = "zebra-walrus-7781"
    body = {**CHAT, "messages": [{"role": "user", "content": secret}]}
    with caplog.at_level(logging.INFO):
        served.post("/v1/chat/completions", body, headers={"X-Request-Id": "log-check"})
        time.sleep(0.1)
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "log-check"]
    assert records and records[0].status == 200  # type: ignore[attr-defined]
    assert all(secret not in r.getMessage() and secret not in str(vars(r))
               for r in caplog.records)


def wait_until(check, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_aborts_its_engine_requests(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.5)
    served = server_factory(backend=backend)
    body = {**CHAT, "max_tokens": 40, "sbon": {"n": 2, "block_size": 2}}  # 20 blocks, ~10 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=0.8)
    assert wait_until(lambda: served.state.admission.in_flight == 0)
    assert backend.num_unfinished_requests() == 0
    calls = len(backend.calls)
    time.sleep(1.0)
    assert len(backend.calls) == calls < 20  # nothing more was generated for the gone client


def test_a_streaming_client_that_disconnects_aborts_too(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.3)
    served = server_factory(backend=backend)
    body = {**CHAT, "max_tokens": 40, "stream": True, "sbon": {"n": 2, "block_size": 2}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role frame
        while "content" not in next(lines):
            pass
    assert wait_until(lambda: served.state.admission.in_flight == 0)
    assert backend.num_unfinished_requests() == 0
    calls = len(backend.calls)
    time.sleep(1.0)
    assert len(backend.calls) == calls < 20
