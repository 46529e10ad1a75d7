#!/usr/bin/env python3
"""A bounded load test of a running SoftBoN Serve on this machine (loopback addresses only).

Sends a fixed number of requests with several times the server's concurrency cap in flight:
a mix of valid requests (plain and streamed), oversized ones (too many prompts, a body over
the limit, a prompt over the character limit) and clients that disconnect early. Meanwhile
it polls /health every 100 ms. A client answered 429 waits about Retry-After before its next
request, as a polite client would. It passes (exit 0) when every answer was 200, a 4xx or a
429, /health always answered 200 within a second, and the engine's unfinished request count
(``sbon_engine_unfinished_requests`` in /metrics) is back to 0 at the end.

    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --requests 200 --cap 16
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import re
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

KINDS = ("valid", "stream", "too_many_prompts", "body_too_large", "prompt_too_long",
         "disconnect")
WEIGHTS = (40, 15, 10, 5, 10, 20)
HEALTH_PERIOD_S = 0.1
HEALTH_LIMIT_S = 1.0
DISCONNECTED = "disconnected"


@dataclass
class Tally:
    """What the run saw: answers by kind and status, latencies, /health."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    health_failures: int = 0
    unexpected: list[str] = field(default_factory=list)


def require_loopback(url: str) -> None:
    """Refuse any target that is not this machine."""
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise SystemExit(f"loadtest: {url} resolves to {address}, not a loopback address")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def request_for(kind: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    sbon = {"n": 2}
    chat = {"model": model, "max_tokens": args.max_tokens, "sbon": sbon,
            "messages": [{"role": "user", "content": "Say something about the sea."}]}
    if kind == "stream":
        return {**chat, "stream": True}
    if kind == "too_many_prompts":
        return {"model": model, "prompt": ["hi"] * (args.max_prompts + 1),
                "max_tokens": args.max_tokens, "sbon": sbon}
    if kind == "body_too_large":
        return {"model": model, "prompt": "x" * (args.max_body_bytes + 1)}
    if kind == "prompt_too_long":
        return {"model": model, "prompt": "y" * (args.max_prompt_chars + 1)}
    return chat


def expected(kind: str, status: int) -> bool:
    if kind in ("valid", "stream", "disconnect"):
        return status in (200, 429)
    wanted = 413 if kind == "body_too_large" else 400
    return status in (wanted, 429)


async def one(client: httpx.AsyncClient, kind: str, model: str, args: argparse.Namespace,
              rng: random.Random, tally: Tally) -> None:
    body = request_for("valid" if kind == "disconnect" else kind, model, args)
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    started = time.perf_counter()
    try:
        if kind == "disconnect":
            timeout = httpx.Timeout(30.0, read=rng.uniform(0.05, 0.5))
            response = await client.post(path, json=body, timeout=timeout)
        elif kind == "stream":
            async with client.stream("POST", path, json=body) as response:
                async for _ in response.aiter_lines():
                    pass
        else:
            response = await client.post(path, json=body)
    except httpx.TimeoutException:
        if kind != "disconnect":
            tally.unexpected.append(f"{kind}: timed out")
        tally.statuses[f"{kind} {DISCONNECTED}"] += 1
        return
    except httpx.TransportError as exc:
        tally.unexpected.append(f"{kind}: {type(exc).__name__}")
        tally.statuses[f"{kind} transport_error"] += 1
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.statuses[f"{kind} {response.status_code}"] += 1
    if not expected(kind, response.status_code):
        tally.unexpected.append(f"{kind}: {response.status_code}")
    if response.status_code == 429:  # a polite client waits as told before its next request
        retry_after = float(response.headers.get("retry-after", "1"))
        await asyncio.sleep(min(retry_after, 2.0) * rng.uniform(0.5, 1.0))


async def watch_health(client: httpx.AsyncClient, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = await client.get("/health", timeout=5.0)
            ok = response.status_code == 200
        except httpx.TransportError:
            ok = False
        elapsed = time.perf_counter() - started
        tally.health_latencies.append(elapsed)
        if not ok or elapsed > HEALTH_LIMIT_S:
            tally.health_failures += 1
        await asyncio.sleep(HEALTH_PERIOD_S)


async def unfinished(client: httpx.AsyncClient, wait_s: float) -> float:
    """The engine's unfinished requests, waiting up to ``wait_s`` for them to reach 0."""
    deadline = time.monotonic() + wait_s
    while True:
        text = (await client.get("/metrics")).text
        match = re.search(r"^sbon_engine_unfinished_requests (\S+)$", text, re.MULTILINE)
        value = float(match.group(1)) if match else float("nan")
        if value == 0 or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    kinds = rng.choices(KINDS, WEIGHTS, k=args.requests)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    tally = Tally()
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        stop = asyncio.Event()
        health = asyncio.create_task(watch_health(client, stop, tally))
        gate = asyncio.Semaphore(args.concurrency)
        started = time.perf_counter()

        async def gated(kind: str) -> None:
            async with gate:
                await one(client, kind, model, args, rng, tally)

        await asyncio.gather(*(gated(k) for k in kinds))
        wall = time.perf_counter() - started
        stop.set()
        await health
        left = await unfinished(client, args.settle_s)
    by_status = Counter(key.split(" ", 1)[1] for key in tally.statuses.elements())
    return {
        "requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 2),
        "by_status": dict(sorted(by_status.items())),
        "by_kind_and_status": dict(sorted(tally.statuses.items())),
        "latency_p50_s": round(percentile(tally.latencies, 50), 3),
        "latency_p99_s": round(percentile(tally.latencies, 99), 3),
        "health_checks": len(tally.health_latencies),
        "health_worst_s": round(max(tally.health_latencies, default=float("nan")), 3),
        "health_mean_s": round(statistics.fmean(tally.health_latencies or [float("nan")]), 4),
        "health_failures": tally.health_failures,
        "engine_unfinished_at_end": left,
        "unexpected": tally.unexpected[:20],
        "passed": not tally.unexpected and tally.health_failures == 0 and left == 0,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--cap", type=int, default=16,
                        help="the server's limits.max_concurrent_requests")
    parser.add_argument("--concurrency", type=int, help="in flight at once (default 4 x cap)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-prompts", type=int, default=16, help="limits.max_prompts")
    parser.add_argument("--max-body-bytes", type=int, default=2_097_152,
                        help="limits.max_body_bytes")
    parser.add_argument("--max-prompt-chars", type=int, default=65536,
                        help="limits.max_prompt_chars")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="how long the engine may take to finish aborted work")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="the server's key (visible to other users in ps; "
                      "prefer --api-key-file)")
    keys.add_argument("--api-key-file", help="a file holding the server's key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.api_key_file:
        try:
            args.api_key = Path(args.api_key_file).read_text().removesuffix("\n")
        except OSError as exc:
            parser.error(f"--api-key-file: {exc.strerror}: {args.api_key_file}")
    args.concurrency = args.concurrency or 4 * args.cap
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_loopback(args.url)
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
