"""A request's life on a real ``sbon serve`` process: admission before any tokenising under
a burst of large prompts, a drain that finishes streams and plain requests alike, and a
reward engine whose death turns /health to 503 and ends the process with 1.

Latencies are measured, printed (``pytest -s``) and bounded with a margin for a machine
shared with other work: the bounds still fail a server that tokenises before it refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from helpers import REPO_ROOT, free_port
from live_server import LiveServer, launch, sbon_command, stop, wait_healthy
from tiny_models import build_tiny_reward_model

MODEL = "smollm2-135m-instruct"
CAP = 4
BURST = 64
PROMPT_CHARS = 60_000
# Targets: a 429 within 50 ms, /health within 100 ms. Bounds for a 2-core machine shared
# with other work (measured there: server's own time <= 17 ms, at the client <= 0.3 s).
SERVER_BOUND_S = 0.1  # from the request's arrival to its 429, as the server logs it
REFUSED_BOUND_S = 1.0  # from the client's last byte sent to the first byte of the 429
HEALTH_BOUND_S = 0.5
VLLM_WORKER_GRACE_S = 5.0  # vLLM waits this long for a worker process to stop
SENTENCE = "The sea is calm tonight and the waves crash on the rocks. "


def start(config: dict[str, Any], folder: Path, **env: str) -> LiveServer:
    """``sbon serve`` with the repository's config.yaml under ``config`` overrides."""
    base = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    for section, values in config.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    port = free_port()
    environ = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    command = [*sbon_command(), "serve", "--config", str(path), "--host", "127.0.0.1",
               "--port", str(port)]
    return launch(command, port, environ, REPO_ROOT, folder / "server.log")


@pytest.fixture(scope="module")
def capped(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[LiveServer]:
    """The embedded model behind a server capped at 4 requests, with a long drain."""
    server = start({"model": {"cache_dir": str(model_cache_dir)},
                    "engine": {"max_model_len": 1024, "kv_cache_gib": 1},
                    "limits": {"max_concurrent_requests": CAP},
                    "server": {"drain_s": 300}},
                   tmp_path_factory.mktemp("capped"))
    try:
        wait_healthy(server.url, server.process, server.log)
        yield server
    finally:
        stop(server.process)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def raw_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def burst(port: int, request: bytes, count: int) -> list[tuple[int, float, bytes]]:
    """Send ``request`` on ``count`` connections at once; for each: (status, seconds from
    its last byte sent to the first byte of its answer, the whole answer).

    Raw sockets and one selector keep the client's own overhead out of the figures (an
    HTTP client library in this process would add its per-request cost to each)."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    first: dict[socket.socket, float] = {}
    answers: dict[socket.socket, bytearray] = {s: bytearray() for s in sockets}
    by_fd = {s.fileno(): s for s in sockets}
    for sock in sockets:
        sock.sendall(request)
        sent[sock] = time.perf_counter()
        selector.register(sock, selectors.EVENT_READ)
    open_sockets = len(sockets)
    deadline = time.monotonic() + 300
    while open_sockets and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            sock = by_fd[key.fd]
            data = sock.recv(65536)
            first.setdefault(sock, time.perf_counter())
            if data:
                answers[sock] += data
            else:  # the server closed it: the answer is complete
                selector.unregister(sock)
                sock.close()
                open_sockets -= 1
    assert not open_sockets, "some burst requests were never answered"
    return [(int(answers[s].split(b" ", 2)[1]), first[s] - sent[s], bytes(answers[s]))
            for s in sockets]


def probe_health(port: int, done: threading.Event) -> list[float]:
    latencies: list[float] = []
    while not done.is_set():
        status, seconds, _ = burst(port, raw_request("GET", "/health"), 1)[0]
        assert status == 200
        latencies.append(seconds)
        time.sleep(0.005)
    return latencies


def body_of(answer: bytes) -> dict[str, Any]:
    payload = answer.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in answer.split(b"\r\n\r\n", 1)[0].lower():
        size, rest = payload.split(b"\r\n", 1)
        payload = rest[: int(size, 16)]
    parsed: dict[str, Any] = json.loads(payload)
    return parsed


def server_durations(server: LiveServer, status: int) -> list[float]:
    """The server's own time for each request answered with ``status`` (its access log)."""
    found = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"msg": "request"' in line:
            record = json.loads(line)
            if record.get("status") == status:
                found.append(float(record["duration_s"]))
    return found


def run_burst(server: LiveServer, content: str, max_tokens: int
              ) -> tuple[list[tuple[int, float, bytes]], list[float], list[float]]:
    """A burst of chat requests with ``content`` while /health is probed: the answers, the
    probes' latencies, and the server's own time for each 429 (its access log)."""
    request = raw_request("POST", "/v1/chat/completions",
                          json.dumps(chat(content, max_tokens=max_tokens)).encode())
    port = int(server.url.rsplit(":", 1)[1])
    logged = len(server_durations(server, 429))
    done = threading.Event()
    health: list[list[float]] = []
    prober = threading.Thread(target=lambda: health.append(probe_health(port, done)))
    prober.start()
    try:
        time.sleep(0.05)  # the prober is running
        results = burst(port, request, BURST)
    finally:
        done.set()
        prober.join(timeout=30)
    time.sleep(0.5)  # the access log is written after each answer
    return results, health[0], server_durations(server, 429)[logged:]


def summary(name: str, results: list[tuple[int, float, bytes]], probes: list[float],
            on_server: list[float]) -> str:
    refused = sorted(s for status, s, _ in results if status == 429)
    return (f"{name}: {len(refused)} refused, {BURST - len(refused)} accepted; 429 after median "
            f"{statistics.median(refused) * 1000:.1f} ms, worst {refused[-1] * 1000:.1f} ms "
            f"(server's own time: worst {max(on_server) * 1000:.1f} ms); /health median "
            f"{statistics.median(probes) * 1000:.1f} ms, worst {max(probes) * 1000:.1f} ms "
            f"over {len(probes)} probes")


def test_a_burst_of_large_prompts_is_refused_before_any_tokenising(capped: LiveServer) -> None:
    # Baseline in the same run: the same burst with a prompt that costs nothing to tokenise
    # (its accepted requests are refused too once planned: max_tokens over the limit).
    small = run_burst(capped, "Hi", max_tokens=100_000)
    assert {status for status, _, _ in small[0]} == {400, 429}
    prompt = (SENTENCE * (PROMPT_CHARS // len(SENTENCE) + 1))[:PROMPT_CHARS]
    results, probes, on_server = run_burst(capped, prompt, max_tokens=8)
    refused = sorted(s for status, s, _ in results if status == 429)
    small_worst = max(s for status, s, _ in small[0] if status == 429)
    print(f"\n{summary('baseline, 2-character prompts', *small)}\n"
          f"{summary(f'{PROMPT_CHARS}-character prompts', results, probes, on_server)}\n"
          f"worst 429, large / baseline: {refused[-1] / small_worst:.2f}")
    codes = {body_of(a)["error"]["code"] for status, _, a in results if status == 429}
    accepted = [(status, body_of(a)) for status, _, a in results if status != 429]
    assert len(refused) >= BURST - 4 * CAP, "the cap did not refuse the burst"
    assert codes == {"rate_limit_exceeded"} and len(on_server) == len(refused)
    # Accepted requests finish: a 60k-character prompt does not fit this model's 1024-token
    # context, which only tokenising can tell.
    assert accepted and all(status == 400 and a["error"]["code"] == "context_length_exceeded"
                            for status, a in accepted)
    # Tokenising one such prompt takes ~0.1 s here: refusing after tokenising would put
    # seconds before the last 429.
    assert max(on_server) < SERVER_BOUND_S, on_server
    # A loaded machine slows the baseline's refusals as much: the bound follows it.
    assert refused[-1] < max(REFUSED_BOUND_S, 3 * small_worst), refused
    assert max(probes) < HEALTH_BOUND_S, probes
    after = httpx.post(f"{capped.url}/v1/chat/completions", json=chat("Hi", max_tokens=4),
                       timeout=120)
    assert after.status_code == 200, after.text


def test_sigterm_drains_streams_and_plain_requests_then_exits_0(capped: LiveServer) -> None:
    """Runs last in this module: it ends the module's server."""
    body = chat("Write a short poem about the sea.", max_tokens=32, seed=1,
                sbon={"n": 2, "block_size": 16})
    plain: list[httpx.Response] = []
    streams: list[list[str]] = []

    def post() -> None:
        plain.append(httpx.post(f"{capped.url}/v1/chat/completions", json=body, timeout=600))

    def stream() -> None:
        frames: list[str] = []
        with httpx.stream("POST", f"{capped.url}/v1/chat/completions", timeout=600,
                          json={**body, "stream": True}) as response:
            frames.extend(line[len("data: "):] for line in response.iter_lines() if line)
        streams.append(frames)

    workers = [threading.Thread(target=t) for t in (post, post, stream, stream)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120
    while in_flight(capped) < 4:
        assert time.monotonic() < deadline, "the four requests never ran together"
        time.sleep(0.05)
    capped.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.join(timeout=600)
    assert [r.status_code for r in plain] == [200, 200], [r.text for r in plain]
    assert all(r.json()["choices"][0]["message"]["content"] for r in plain)
    assert len(streams) == 2
    for frames in streams:
        assert frames[-1] == "[DONE]", frames[-3:]
        chunks = [json.loads(f) for f in frames[:-1]]
        assert not any("error" in c for c in chunks), chunks[-2:]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert capped.process.wait(timeout=120) == 0, capped.log_tail()


def in_flight(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("sbon_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def health_while_loading(server: LiveServer, timeout: float = 900) -> list[float]:
    """Latencies of /health answers from the first one until the first 200."""
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log_tail()
        started = time.monotonic()
        try:
            status = httpx.get(f"{server.url}/health", timeout=30).status_code
        except httpx.ConnectError:
            time.sleep(0.2)  # not listening yet
            continue
        latencies.append(time.monotonic() - started)
        if status == 200:
            return latencies
        time.sleep(0.2)
    raise AssertionError(f"never ready:\n{server.log_tail()}")


def engine_cores(server: LiveServer) -> list[psutil.Process]:
    """The server's vLLM engine core processes, oldest first (the generator's first)."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in c.name()]
    return sorted(cores, key=lambda c: c.create_time())


def test_a_dead_reward_engine_is_503_on_health_and_exit_1(
        model_cache_dir: Path, tmp_path: Path) -> None:
    reward = build_tiny_reward_model(tmp_path / "rm", hidden_size=128, heads=2)
    check_s = 0.5
    server = start({"model": {"cache_dir": str(model_cache_dir)},
                    "engine": {"max_model_len": 1024, "kv_cache_gib": 1},
                    "rewards": [{"name": "rm", "type": "vllm", "model": str(reward),
                                 "max_model_len": 256, "kv_cache_gib": 1}],
                    "default_reward": "rm",
                    "server": {"engine_check_s": check_s}},
                   tmp_path / "server",
                   VLLM_ENABLE_V1_MULTIPROCESSING="1")  # each engine in its own process
    try:
        loading = health_while_loading(server)
        print(f"\n/health while both engines loaded: {len(loading)} answers, worst "
              f"{max(loading):.3f} s")
        # The event loop stayed free: the reward engine alone takes 30-100 s to build here,
        # which on the loop would hold every answer that long (a loaded machine: 5 s bound).
        assert max(loading) < 5.0, loading
        cores = engine_cores(server)
        assert len(cores) == 2, [c.name() for c in cores]
        pooling = cores[-1]  # started after the generator
        for process in [*pooling.children(recursive=True), pooling]:
            process.kill()
        killed = time.monotonic()
        statuses: list[tuple[int, float]] = []
        while server.process.poll() is None and time.monotonic() - killed < check_s + 60:
            with contextlib.suppress(httpx.TransportError):  # closing its listener
                status = httpx.get(f"{server.url}/health", timeout=2).status_code
                statuses.append((status, time.monotonic() - killed))
            time.sleep(0.05)
        code = server.process.wait(timeout=60)
        exited = time.monotonic() - killed
        first_503 = next((t for status, t in statuses if status == 503), None)
        print(f"\nreward engine killed: /health 503 after {first_503} s, exit {code} after "
              f"{exited:.2f} s; /health {[s for s, _ in statuses]}")
        assert first_503 is not None and first_503 < check_s + 5, statuses
        assert all(status == 503 for status, t in statuses if t >= first_503), statuses
        assert code == 1, server.log_tail()
        # Within engine_check_s + 5 s, plus vLLM's own grace (5 s) for the worker processes
        # of the generator, which this test runs outside the server process.
        assert exited < check_s + 5 + VLLM_WORKER_GRACE_S, exited
        assert "the reward 'rm' died" in server.log.read_text(errors="replace")
    finally:
        stop(server.process)
