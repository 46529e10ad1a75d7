"""The CPU image in a real container: Docker's defaults (64 MiB /dev/shm, no compiler in the
image, no network), a non-root user, HEALTHCHECK, scored and streamed chat completions from
inside the container, and a clean ``docker stop``. The tests run in file order and share one
container; the last one stops it."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest
from docker_harness import MEASUREMENTS, Container, docker

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
DOCKER_STOP_GRACE_S = 10  # `docker stop` without -t

POST_SCRIPT = """
import json, sys, time, urllib.request, urllib.error
body = json.loads(sys.argv[1])
request = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
started = time.monotonic()
try:
    response = urllib.request.urlopen(request, timeout=600)
    status, headers, text = response.status, dict(response.headers), response.read().decode()
except urllib.error.HTTPError as exc:
    status, headers, text = exc.code, dict(exc.headers), exc.read().decode()
print(json.dumps({"status": status, "content_type": headers.get("content-type", ""),
                  "text": text, "seconds": time.monotonic() - started}))
"""


def post(container: Container, body: dict[str, Any]) -> dict[str, Any]:
    reply = container.python(POST_SCRIPT, json.dumps(body))
    assert isinstance(reply, dict)
    return reply


def test_the_container_runs_as_the_unprivileged_user(cpu_container: Container) -> None:
    config = json.loads(docker("inspect", "--format", "{{json .Config}}",
                               cpu_container.name).stdout)
    assert config["User"] == "10001:10001"
    server_uid = docker("exec", cpu_container.name, "sh", "-c",
                        "awk '/^Uid:/ {print $2}' /proc/1/status").stdout.strip()
    assert server_uid == "10001"  # the server process itself, not only `docker exec`


def test_the_healthcheck_turns_healthy(cpu_container: Container) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = cpu_container.state()["Health"]
        if health["Status"] == "healthy":
            break
        assert health["Status"] == "starting", health
        time.sleep(1.0)
    else:
        pytest.fail(f"HEALTHCHECK did not report healthy: {cpu_container.state()['Health']}")
    MEASUREMENTS["healthcheck_healthy_after_s"] = round(
        time.monotonic() - cpu_container.started, 1)


def test_the_self_test_ran_before_health(cpu_container: Container) -> None:
    passed = [json.loads(line) for line in cpu_container.logs().splitlines()
              if line.startswith("{") and '"self-test passed"' in line]
    assert len(passed) == 1, cpu_container.logs()[-4000:]
    MEASUREMENTS["selftest_s"] = passed[0]["selftest_s"]


def test_a_scored_chat_completion(cpu_container: Container) -> None:
    for attempt in ("first", "second"):
        reply = post(cpu_container, {"model": MODEL, "messages": MESSAGES, "max_tokens": 16,
                                     "seed": 1, "sbon": {"n": 2, "lambda": 0.5}})
        assert reply["status"] == 200, reply
        MEASUREMENTS[f"scored_request_{attempt}_s"] = round(float(reply["seconds"]), 2)
    body = json.loads(str(reply["text"]))
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    sbon = choice["sbon"]
    assert sbon["n"] == 2 and sbon["scored"] is True and sbon["reward"] == "judge"
    assert len(sbon["rewards"]) == 2 and all(math.isfinite(r) for r in sbon["rewards"])
    assert math.isclose(sum(sbon["weights"]), 1.0, abs_tol=1e-6)
    assert body["usage"]["completion_tokens"] > 0
    MEASUREMENTS["scored_response"] = {"status": reply["status"], "sbon_keys": sorted(sbon)}


def test_a_blockwise_streamed_chat_completion(cpu_container: Container) -> None:
    reply = post(cpu_container, {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 16, "seed": 2, "stream": True,
        "stream_options": {"include_usage": True},
        "sbon": {"n": 2, "lambda": 1.0, "block_size": 8}})
    assert reply["status"] == 200, reply
    assert str(reply["content_type"]).startswith("text/event-stream")
    frames = re.findall(r"^data: (.*)$", str(reply["text"]), re.MULTILINE)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    assert text
    finals = [c["choices"][0] for c in chunks if c["choices"] and
              c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    blocks = finals[0]["sbon"]["blocks"]
    assert 1 <= len(blocks) <= 2 and all(len(b["rewards"]) == 2 for b in blocks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    MEASUREMENTS["streamed_response"] = {"status": reply["status"], "frames": len(frames),
                                         "blocks": len(blocks),
                                         "seconds": round(float(reply["seconds"]), 2)}


def test_docker_stop_ends_it_cleanly_within_the_grace_period(cpu_container: Container) -> None:
    started = time.monotonic()
    docker("stop", cpu_container.name, timeout=DOCKER_STOP_GRACE_S + 60)
    stop_s = time.monotonic() - started
    cpu_container.stopped = True
    state = cpu_container.state()
    logs = cpu_container.logs()
    MEASUREMENTS["stop_s"] = round(stop_s, 1)
    MEASUREMENTS["exit_code"] = state["ExitCode"]
    assert stop_s < DOCKER_STOP_GRACE_S, logs[-4000:]  # SIGTERM sufficed, no SIGKILL
    assert state["ExitCode"] == 0 and not state["OOMKilled"], logs[-4000:]
    assert "Application shutdown complete" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
