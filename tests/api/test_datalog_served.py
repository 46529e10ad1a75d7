"""The distillation log of a served app over fakes: one record per returned choice."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from api_harness import Served

from server.datalog import read_log
from server.planning import choice_seed

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def logged(folder: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The records of ``folder`` once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_log(folder).records if folder.exists() else []
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.01)


def start(server_factory: Callable[..., Served], folder: Path) -> Served:
    return server_factory(datalog={"enabled": True, "dir": str(folder), "flush_records": 1})


def test_every_returned_choice_is_one_record(server_factory: Callable[..., Served],
                                             tmp_path: Path) -> None:
    served = start(server_factory, tmp_path)
    response = served.post("/v1/completions", {
        "model": "fake-model", "prompt": ["first prompt", "second prompt"], "n": 2,
        "max_tokens": 4, "seed": 3, "sbon": {"n": 3, "lambda": 0.5, "return_candidates": True}},
        headers={"X-Request-Id": "batch-1"})
    assert response.status_code == 200
    choices = response.json()["choices"]
    records = logged(tmp_path, 4)
    assert len(records) == 4
    assert {r["request_id"] for r in records} == {"batch-1"}
    by_text = {(r["prompt"], r["text"]) for r in records}
    assert by_text == {(["first prompt", "second prompt"][c["index"] // 2], c["text"])
                       for c in choices}
    for record in records:
        assert record["model"] == "fake-model" and record["reward"] == "fake"
        settings = record["settings"]
        assert settings["n"] == 3 and settings["lambda"] == 0.5 and settings["seed"] is not None
        (block,) = record["blocks"]
        assert len(block["candidates"]) == 3
        chosen = block["candidates"][block["chosen_index"]]
        assert chosen["text"] == record["text"]
        assert chosen["reward"] == -len(chosen["text"])  # the fake reward: minus the length
    # Each choice's own seed, derived from the request's as the server runs it.
    for prompt in ("first prompt", "second prompt"):
        seeds = [r["settings"]["seed"] for r in records if r["prompt"] == prompt]
        assert len(seeds) == 2 and set(seeds) == {choice_seed(3, c) for c in range(2)}


def test_streamed_blockwise_chat_is_logged(server_factory: Callable[..., Served],
                                           tmp_path: Path) -> None:
    served = start(server_factory, tmp_path)
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={
            "model": "fake-model", "messages": MESSAGES, "max_tokens": 6, "stream": True,
            "sbon": {"n": 2, "lambda": 0, "block_size": 2}}, timeout=30) as response:
        assert response.status_code == 200
        body = "".join(response.iter_text())
    assert body.rstrip().endswith("data: [DONE]")
    (record,) = logged(tmp_path, 1)
    assert record["prompt"] == MESSAGES
    assert record["settings"]["block_size"] == 2 and len(record["blocks"]) == 3
    assert record["text"] == "".join(b["candidates"][b["chosen_index"]]["text"]
                                     for b in record["blocks"])


def test_a_request_with_log_false_writes_nothing(server_factory: Callable[..., Served],
                                                 tmp_path: Path) -> None:
    served = start(server_factory, tmp_path)
    for body, request_id in (({"sbon": {"log": False, "n": 2}}, "private"),
                             ({"sbon": {"log": True, "n": 2}}, "public"),
                             ({}, "default")):
        response = served.post("/v1/chat/completions", {
            "model": "fake-model", "messages": MESSAGES, "max_tokens": 3, **body},
            headers={"X-Request-Id": request_id})
        assert response.status_code == 200
    records = logged(tmp_path, 2)
    time.sleep(0.2)  # anything written late would show now
    assert sorted(r["request_id"] for r in read_log(tmp_path).records) == ["default", "public"]
    assert len(records) == 2
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'sbon_datalog_records_total{outcome="written"} 2.0' in metrics
    assert "sbon_datalog_queue_records 0.0" in metrics


def test_records_are_written_at_once_and_synced_by_policy(server_factory: Callable[..., Served],
                                        tmp_path: Path) -> None:
    served = server_factory(datalog={"enabled": True, "dir": str(tmp_path),
                                     "flush_records": 1000, "flush_seconds": 3600})
    response = served.post("/v1/chat/completions", {
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 3})
    assert response.status_code == 200
    assert len(logged(tmp_path, 1)) == 1  # written at once, synced later
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'sbon_datalog_records_total{outcome="written"}' not in metrics
    assert served.state.datalog is not None and served.state.datalog.written == 0
