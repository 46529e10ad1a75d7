"""The real ``sbon serve`` process on the embedded model, through the official openai client.

Token counts stay small: the CPU generates a few dozen tokens a second.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time

import httpx
import pytest
from helpers import REPO_ROOT, free_port
from live_server import LiveServer, sbon_command

from server.protocol import ChatCompletionResponse, to_json

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def gauge(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else math.nan


# The ``sbon`` object of a scored blockwise choice without return_candidates: key -> type.
SBON_BLOCKWISE_TYPES: dict[str, type | tuple[type, ...]] = {
    "n": int, "lambda": float, "block_size": int, "normalize": str, "reward": str,
    "scored": bool, "blocks": list, "rewards": list, "weights": list, "ess": float,
    "kl_from_uniform": float, "kl_bon_bound": float, "kl_estimate": float,
    "win_rate_bound": float, "tokens_generated": int, "tokens_scored": int,
    "tokens_computed": int, "tokens_prefilled": dict, "tokens_cached": dict, "timings_s": dict,
    "kl_budget": type(None), "lambdas": list, "block_delimiter": type(None),
}
BLOCK_TYPES: dict[str, type | tuple[type, ...]] = {
    "index": int, "chosen_index": int, "rewards": list, "weights": list, "ess": float,
    "kl_from_uniform": float, "kl_estimate": float, "lambda": float,
}


def check_types(value: dict, types: dict[str, type | tuple[type, ...]]) -> None:
    assert set(value) == set(types), sorted(set(value) ^ set(types))
    for key, expected in types.items():
        assert isinstance(value[key], expected) and not (
            expected in (int, float) and isinstance(value[key], bool)), (key, value[key])


def test_chat_completion_with_and_without_sbon(live_server: LiveServer) -> None:
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=600, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 16, "seed": 1,
        "sbon": {"n": 3, "lambda": 0.5, "block_size": 8}})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    exactly_one_response = ChatCompletionResponse.model_validate(body)
    assert to_json(exactly_one_response) == body  # no field beyond the protocol's
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert isinstance(body["id"], str) and body["id"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    (choice,) = body["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason", "sbon"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(isinstance(v, int) for v in usage.values())
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 16

    sbon = choice["sbon"]
    check_types(sbon, SBON_BLOCKWISE_TYPES)
    assert (sbon["n"], sbon["lambda"], sbon["block_size"]) == (3, 0.5, 8)
    assert sbon["lambdas"] == [0.5] * len(sbon["blocks"])
    assert sbon["normalize"] == "raw" and sbon["reward"] == "judge" and sbon["scored"] is True
    assert 1 <= len(sbon["blocks"]) <= 2
    for index, block in enumerate(sbon["blocks"]):
        check_types(block, BLOCK_TYPES)
        assert block["index"] == index and 0 <= block["chosen_index"] < 3
        assert len(block["rewards"]) == 3 and all(math.isfinite(r) for r in block["rewards"])
        assert sum(block["weights"]) == pytest.approx(1.0)
    assert sbon["rewards"] == sbon["blocks"][-1]["rewards"]  # of the final selection
    assert sbon["weights"] == sbon["blocks"][-1]["weights"]
    assert 1.0 <= sbon["ess"] <= 3.0
    assert 0.0 <= sbon["kl_estimate"] <= sbon["kl_bon_bound"] + 1e-9
    assert sbon["tokens_generated"] >= usage["completion_tokens"]
    assert sbon["tokens_scored"] > 0
    for counts in (sbon["tokens_prefilled"], sbon["tokens_cached"]):
        assert set(counts) == {"generation", "scoring"}
        assert all(isinstance(v, int) and v >= 0 for v in counts.values())
    assert set(sbon["timings_s"]) >= {"generation", "scoring", "selection"}
    assert all(isinstance(v, float) and v >= 0 for v in sbon["timings_s"].values())

    client = live_server.client()
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content is not None
    assert plain.choices[0].model_extra["sbon"]["n"] == 4  # type: ignore[index]  # config default


def test_streaming_chat_and_completions(live_server: LiveServer) -> None:
    client = live_server.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_body={"sbon": {"n": 2, "lambda": 1.0, "block_size": 8}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    completion = client.completions.create(
        model=MODEL, prompt="The sea is", max_tokens=8, stream=True, seed=3,
        extra_body={"sbon": {"n": 2}})
    pieces = [c.choices[0].text for c in completion if c.choices]
    assert "".join(pieces)


def test_a_disconnected_client_leaves_no_engine_requests(live_server: LiveServer) -> None:
    # A long answer in many scored blocks: far from done when the client gives up.
    body = {"model": MODEL, "max_tokens": 400, "sbon": {"n": 8, "block_size": 16},
            "messages": [{"role": "user", "content": "Write a long essay, in many "
                          "paragraphs, on the history of sailing ships."}]}
    seen = {"max": 0.0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen["max"] = max(seen["max"], gauge(live_server, "sbon_engine_unfinished_requests"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=1.5)
    finally:
        time.sleep(0.5)
        stop.set()
        watcher.join()
    assert seen["max"] >= 1, "the request never reached the engine"
    deadline = time.monotonic() + 15
    while gauge(live_server, "sbon_engine_unfinished_requests") != 0:
        assert time.monotonic() < deadline, "engine requests were left running"
        time.sleep(0.2)


def test_metrics_move_and_health_is_ok(live_server: LiveServer) -> None:
    health = httpx.get(f"{live_server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["model"] == MODEL
    count = "sbon_phase_duration_seconds_count"
    before = httpx.get(f"{live_server.url}/metrics").text
    live_server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                            extra_body={"sbon": {"n": 2}})
    after = httpx.get(f"{live_server.url}/metrics").text

    def value(text: str, phase: str) -> float:
        match = re.search(rf'^{count}{{phase="{phase}"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    for phase in ("queue", "generation", "scoring", "selection", "total"):
        assert value(after, phase) == value(before, phase) + 1, phase


def test_a_server_whose_model_cannot_load_exits_non_zero(tmp_path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [*sbon_command(), "serve", "--port", str(free_port()),
         "--set", f"model.name={tmp_path / 'missing-model'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "failed to start" in done.stderr


def test_bench_against_the_running_server(live_server: LiveServer, tmp_path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [*sbon_command(), "bench", "--url", live_server.url, "--n", "2", "--max-tokens", "8",
         "--block-sizes", "4", "--concurrency", "1", "--prompts", "2", "--out", str(out)],
        cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["plain", "per-response", "blockwise-4"]
    assert report["target"] == live_server.url
    plain = report["runs"][0]
    for ratio in report["ratios"]:
        run = next(r for r in report["runs"] if r["method"] == ratio["method"])
        assert ratio["requests_per_s"] == pytest.approx(
            run["requests_per_s"] / plain["requests_per_s"])
        assert run["phase_mean_s"]["scoring"] > 0
    assert (out / "bench.png").stat().st_size > 0 and "plain" in done.stdout
