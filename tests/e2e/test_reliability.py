"""Reliability of a real ``sbon serve`` process on the embedded model.

One server answers /health while it loads, survives a small mixed load (scripts/loadtest.py)
and then drains on SIGTERM with two requests in flight; another has its engine killed and
must answer the request in flight with a 503 and exit non-zero. Each test starts its own
process (both end it), with small limits so the CPU finishes in a few minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from helpers import REPO_ROOT, free_port
from live_server import LiveServer, launch, sbon_command, stop

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
LIMITS = {"SBON_LIMITS__MAX_CONCURRENT_REQUESTS": "2", "SBON_LIMITS__MAX_PROMPTS": "4",
          "SBON_LIMITS__MAX_BODY_BYTES": "65536", "SBON_LIMITS__MAX_PROMPT_CHARS": "4000"}


def start(model_cache_dir: Path, log: Path, **env: str) -> LiveServer:
    port = free_port()
    environ = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1",
                   SBON_ENGINE__MAX_MODEL_LEN="1024", **LIMITS, **env)
    command = [*sbon_command(), "serve", "--config", str(REPO_ROOT / "config.yaml"),
               "--host", "127.0.0.1", "--port", str(port)]
    return launch(command, port, environ, REPO_ROOT, log)


def health_until_ready(server: LiveServer, timeout: float = 900) -> list[tuple[int, float]]:
    """(status, seconds) of every /health answer until the first 200."""
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log_tail()
        started = time.monotonic()
        try:
            status = httpx.get(f"{server.url}/health", timeout=10).status_code
        except httpx.TransportError:
            time.sleep(0.2)  # not listening yet
            continue
        seen.append((status, time.monotonic() - started))
        if status == 200:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"never ready:\n{server.log_tail()}")


def gauge(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return float("nan")


def test_health_while_loading_a_mixed_load_and_a_graceful_drain(model_cache_dir: Path,
                                                                tmp_path: Path) -> None:
    server = start(model_cache_dir, tmp_path / "server.log", SBON_SERVER__DRAIN_S="120")
    try:
        seen = health_until_ready(server)
        loading = [s for s in seen if s[0] == 503]
        assert loading, "no 503 while loading: /health did not answer during the start"
        assert max(latency for _, latency in seen) < 2.0, seen  # the loop stayed free
        load = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "loadtest.py"), "--url", server.url,
             "--requests", "32", "--cap", "2", "--max-prompts", "4",
             "--max-body-bytes", "65536", "--max-prompt-chars", "4000", "--max-tokens", "8",
             "--settle-s", "60", "--json", str(tmp_path / "load.json")],
            capture_output=True, text=True, timeout=600)
        print(load.stdout)  # the figures, for the record (pytest -s)
        assert load.returncode == 0, load.stdout + load.stderr + server.log_tail()
        summary = json.loads((tmp_path / "load.json").read_text())
        assert set(summary["by_status"]) <= {"200", "400", "413", "429", "disconnected"}
        assert summary["health_worst_s"] < 1.0 and summary["engine_unfinished_at_end"] == 0

        results: list[httpx.Response] = []
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "seed": 1,
                "sbon": {"n": 2, "block_size": 16}}
        workers = [threading.Thread(target=lambda: results.append(httpx.post(
            f"{server.url}/v1/chat/completions", json=body, timeout=300))) for _ in range(2)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while gauge(server, "sbon_requests_in_flight") < 2:
            assert time.monotonic() < deadline, "the two requests never ran together"
            time.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.join(timeout=300)
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        assert all(r.json()["choices"][0]["message"]["content"] for r in results)
        assert server.process.wait(timeout=120) == 0, server.log_tail()
    finally:
        stop(server.process)


def engine_processes(server: LiveServer) -> list[psutil.Process]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    named = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
    return named or children


def test_a_dead_engine_answers_503_and_the_server_exits_non_zero(model_cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    server = start(model_cache_dir, tmp_path / "server.log",
                   SBON_SERVER__ENGINE_CHECK_S="0.5")
    try:
        health_until_ready(server)
        engines = engine_processes(server)
        if not engines:  # the engine runs inside the server process: its death is the exit
            return
        result: list[httpx.Response] = []
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400,
                "sbon": {"n": 2, "block_size": 16}}
        worker = threading.Thread(target=lambda: result.append(httpx.post(
            f"{server.url}/v1/chat/completions", json=body, timeout=300)))
        worker.start()
        deadline = time.monotonic() + 60
        while gauge(server, "sbon_engine_unfinished_requests") < 1:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.1)
        for process in engines:
            process.kill()
        worker.join(timeout=120)
        assert result and result[0].status_code == 503, result and result[0].text
        assert result[0].json()["error"]["type"] == "service_unavailable_error"
        code = server.process.wait(timeout=120)
        assert code != 0, server.log_tail()
    finally:
        stop(server.process)
