#!/usr/bin/env python3
"""/health latency of a running SoftBoN Serve while parse-heavy bodies are in flight.

Sends ``--heavy`` chat bodies of ``--parts`` tiny content parts each (over the server's
``limits.max_content_parts``, under its body limit), optionally one ``--blockwise`` request,
and polls /health every 20 ms meanwhile; prints median, p99 and worst per run. Loopback only.

    .venv/bin/python scripts/health_probe.py --url http://127.0.0.1:8000 --runs 3
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

PART = b'{"type":"text","text":"a"}'


def heavy_body(model: str, parts: int) -> bytes:
    return (b'{"model":"' + model.encode() + b'","max_tokens":4,"messages":[{"role":"user",'
            b'"content":[' + b",".join([PART] * parts) + b"]}]}")


def blockwise_body(model: str) -> bytes:
    prompt = "write a haiku about the sea " + "the sea is blue and calm " * 2400
    return httpx.Request("POST", "http://127.0.0.1", json={
        "model": model, "max_tokens": 64, "messages": [{"role": "user", "content": prompt}],
        "sbon": {"n": 16, "block_size": 8}}).content


def poll(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)


def one_run(url: str, bodies: list[bytes], idle_s: float) -> tuple[list[float], list[int]]:
    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(url, stop, latencies))
    poller.start()
    time.sleep(idle_s)

    def send(body: bytes) -> None:
        statuses.append(httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300,
                                   headers={"content-type": "application/json"}).status_code)

    senders = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    time.sleep(idle_s)
    stop.set()
    poller.join()
    return latencies, sorted(statuses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--parts", type=int, default=150_000)
    parser.add_argument("--heavy", type=int, default=4, choices=range(0, 17))
    parser.add_argument("--blockwise", action="store_true")
    parser.add_argument("--idle-s", type=float, default=0.2,
                        help="polling before and after the requests (a baseline with --heavy 0)")
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 21))
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        parser.error("--url must be a loopback address")
    bodies = [heavy_body(args.model, args.parts)] * args.heavy
    if args.blockwise:
        bodies.append(blockwise_body(args.model))
    size = len(bodies[0]) if args.heavy else 0
    print(f"{args.heavy} bodies of {size} bytes, blockwise: {args.blockwise}")
    for run in range(args.runs):
        latencies, statuses = one_run(args.url, bodies, args.idle_s)
        ms = sorted(x * 1000 for x in latencies)
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        print(f"run {run + 1}: {len(ms)} probes, median {statistics.median(ms):.1f} ms, "
              f"p99 {p99:.1f} ms, worst {ms[-1]:.1f} ms; statuses {statuses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
