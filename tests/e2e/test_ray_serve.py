"""Ray Serve replicas (``sbon serve-ray --replicas 2``) under load, and one killed mid-load.

A local Ray head of 2 CPUs runs two replicas of the app, each with its own engine on a tiny
Llama built from a config (fast to start) and the judge. 32 requests at concurrency 8 must
all succeed and be spread over both replicas, each replica's own /metrics counting its
share; then one replica is killed while requests run: only requests it held may fail (5xx
or a dropped connection, never a hang), and Ray's replacement serves within 120 s.
End-to-end tier: real processes (Ray head, proxy, replicas).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from helpers import REPO_ROOT, free_port
from live_server import LiveServer, launch, sbon_command, stop, wait_healthy
from ray_cluster import local_ray_head
from tiny_models import build_tiny_generator

from engine.model_prep import prepare_embedded_model

MODEL = "tiny-replicas"
HEADER = "x-sbon-replica"
PER_REPLICA_CAP = 4  # limits.max_concurrent_requests = Ray's max_ongoing_requests
REQUEST_TIMEOUT_S = 240  # limits.request_timeout_s of the replicas
RESTART_LIMIT_S = 120


@dataclass
class Outcome:
    status: int | str  # an HTTP status, or the transport error's name
    replica: str | None
    seconds: float


@pytest.fixture(scope="module")
def replicas(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[LiveServer]:
    pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray-serve")
    generator = build_tiny_generator(folder / "generator", prepare_embedded_model(model_cache_dir))
    config = {
        "model": {"name": str(generator), "served_name": MODEL},
        "engine": {"max_model_len": 512, "kv_cache_gib": 1},
        "rewards": [{"name": "judge", "type": "judge"}],
        "limits": {"max_concurrent_requests": PER_REPLICA_CAP,
                   "request_timeout_s": REQUEST_TIMEOUT_S},
        "server": {"log_json": False, "drain_s": 5},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    with local_ray_head(folder, cpus=2) as address:
        command = [*sbon_command(), "serve-ray", "--config", str(folder / "config.yaml"),
                   "--replicas", "2", "--cpus-per-replica", "1", "--address", address,
                   "--host", "127.0.0.1", "--port", str(port)]
        server = launch(command, port, dict(os.environ, HF_HUB_OFFLINE="1"), REPO_ROOT,
                        folder / "serve-ray.log")
        try:
            wait_healthy(server.url, server.process, server.log)
            yield server
        finally:
            stop(server.process, timeout=120)


def chat(url: str, max_tokens: int) -> Outcome:
    body = {"model": MODEL, "max_tokens": max_tokens, "seed": 3,
            "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
            "sbon": {"n": 2}}
    started = time.monotonic()
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=body,
                            timeout=REQUEST_TIMEOUT_S + 60)
        status: int | str = answer.status_code
        replica = answer.headers.get(HEADER)
    except httpx.TransportError as exc:
        status, replica = type(exc).__name__, None
    return Outcome(status, replica, time.monotonic() - started)


def load(url: str, requests: int, concurrency: int, max_tokens: int) -> list[Outcome]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: chat(url, max_tokens), range(requests)))


def served_chats(metrics_text: str) -> float:
    """Successful chat completions in one replica's /metrics."""
    total = 0.0
    for line in metrics_text.splitlines():
        if (line.startswith("sbon_requests_total{") and "chat/completions" in line
                and re.search(r'(status|code)="200"', line)):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_by_replica(url: str, replicas: set[str], timeout: float = 60) -> dict[str, float]:
    """Each replica's own count: /metrics asked until every replica has answered once."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while set(seen) < replicas and time.monotonic() < deadline:
        answer = httpx.get(f"{url}/metrics", timeout=30)
        replica = answer.headers.get(HEADER)
        if answer.status_code == 200 and replica:
            seen[replica] = served_chats(answer.text)
    return seen


def replica_processes() -> list[psutil.Process]:
    """The replica actors' processes (Ray titles them ``ray::ServeReplica:<app>:<class>``)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica") and "SoftBoNReplica" in title:
            found.append(process)
    return found


def test_load_is_spread_over_both_replicas_and_each_counts_its_share(
        replicas: LiveServer) -> None:
    outcomes = load(replicas.url, requests=32, concurrency=8, max_tokens=16)
    statuses = Counter(o.status for o in outcomes)
    print({"statuses": dict(statuses), "by_replica": Counter(o.replica for o in outcomes),
           "slowest_s": round(max(o.seconds for o in outcomes), 1)})
    assert statuses == {200: 32}, statuses
    by_replica = Counter(o.replica for o in outcomes)
    assert len(by_replica) == 2 and min(by_replica.values()) >= 4, by_replica
    counted = metrics_by_replica(replicas.url, set(by_replica))
    assert set(counted) == set(by_replica), counted
    for replica, served in by_replica.items():
        assert counted[replica] == served, (replica, counted, by_replica)


def test_a_killed_replica_loses_only_its_requests_and_is_replaced(
        replicas: LiveServer) -> None:
    known = {o.replica for o in load(replicas.url, requests=8, concurrency=8, max_tokens=4)}
    processes = replica_processes()
    assert len(processes) == 2 and len(known) == 2, (processes, known)
    outcomes: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcomes.extend(
        load(replicas.url, requests=32, concurrency=8, max_tokens=48)))
    runner.start()
    time.sleep(5)  # both replicas are serving their share
    processes[0].kill()
    killed_at = time.monotonic()
    runner.join(timeout=REQUEST_TIMEOUT_S * 4)
    assert not runner.is_alive(), "requests hung after a replica died"
    failed = [o for o in outcomes if o.status != 200]
    print({"failed": [(o.status, round(o.seconds, 1)) for o in failed],
           "served_by": Counter(o.replica for o in outcomes if o.status == 200)})
    assert len(outcomes) == 32
    assert len(failed) <= PER_REPLICA_CAP, failed  # at most what the victim held
    assert all(isinstance(o.status, str) or o.status >= 500 for o in failed), failed
    assert all(o.seconds < REQUEST_TIMEOUT_S + 30 for o in outcomes)

    replaced = None
    while time.monotonic() - killed_at < RESTART_LIMIT_S and replaced is None:
        answer = chat(replicas.url, max_tokens=4)
        if answer.status == 200 and answer.replica not in known:
            replaced = answer.replica
        time.sleep(1)
    print({"replaced_by": replaced, "after_s": round(time.monotonic() - killed_at, 1)})
    assert replaced, f"no new replica served within {RESTART_LIMIT_S} s"

