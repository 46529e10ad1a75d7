"""Python reward functions in worker processes (``isolation: process``).

A thread running a function that never returns cannot be stopped; a process can. Each
worker process imports the function once and scores one batch of pairs at a time. A batch
that has not answered within the reward's ``timeout_s``, or whose caller gave up, has its
worker killed and replaced, so a hanging function costs one restart, never a worker for good.
The price: pairs and values cross a pipe, and each worker holds its own interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from reward.base import RewardError
from reward.callables import as_float, load_callable

logger = logging.getLogger(__name__)

Reply = tuple[str, Any]  # ("ok", [floats]) | ("error", detail) | ("invalid", detail)


def _call(function: Any, text: str, response: str) -> Any:
    if inspect.iscoroutinefunction(function):
        return asyncio.run(function(text, response))
    return function(text, response)


def _answer(function: Any, texts: list[str], responses: list[str]) -> Reply:
    try:
        values = [_call(function, t, r) for t, r in zip(texts, responses, strict=True)]
    except Exception as exc:
        return "error", f"failed: {type(exc).__name__}"
    try:
        return "ok", [as_float(v) for v in values]
    except ValueError as exc:
        return "invalid", str(exc)


def serve(conn: Connection, spec: str) -> None:
    """A worker process: import the function, then answer jobs until the pipe closes."""

    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function: Any = load_callable(spec)
    except Exception as exc:
        function, failure = None, f"cannot load '{spec}': {type(exc).__name__}: {exc}"
    while True:
        try:
            texts, responses = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(("error", failure) if function is None else _answer(function, texts,
                                                                         responses))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection


class ProcessPool:
    """A fixed number of worker processes for one reward; hung ones are replaced."""

    def __init__(self, name: str, spec: str, workers: int, timeout_s: float) -> None:
        self.name = name
        self._spec = spec
        self._size = workers
        self._timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self.restarts = 0  # workers killed and replaced (hung or died)

    async def start(self) -> None:
        """Start the workers and check that each can load the function."""
        self._idle = asyncio.Queue()
        for _ in range(self._size):
            self._idle.put_nowait(self._spawn())
        await asyncio.gather(*(self.call([], []) for _ in range(self._size)))

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=serve, args=(child, self._spec), daemon=True,
                                        name=f"reward-{self.name}")
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self._all.append(worker)
        return worker

    async def call(self, texts: list[str], responses: list[str]) -> list[float]:
        """The function's values for the pairs; a RewardError naming the reward otherwise."""
        if self._idle is None:
            raise RewardError(f"reward '{self.name}' is not started")
        worker = await self._idle.get()
        healthy = False
        try:
            async with asyncio.timeout(self._timeout_s):
                kind, payload = await _exchange(worker, (texts, responses))
            healthy = True
        except TimeoutError:
            raise RewardError(f"reward '{self.name}' did not answer within "
                              f"{self._timeout_s:g} s; its worker process was replaced") from None
        except (EOFError, OSError) as exc:
            raise RewardError(f"reward '{self.name}': its worker process died") from exc
        finally:
            self._idle.put_nowait(worker if healthy else self._replace(worker))
        if kind != "ok":
            raise RewardError(f"reward '{self.name}' {payload}")
        return list(payload)

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill ``worker`` (it may be running the function still) and start another."""
        self.restarts += 1
        logger.warning("reward worker process replaced", extra={"reward": self.name})
        _stop(worker)
        self._all.remove(worker)
        return self._spawn()

    async def close(self) -> None:
        for worker in self._all:
            _stop(worker)
        self._all.clear()
        self._idle = None

    def pids(self) -> list[int | None]:
        """The workers' process ids (for tests and diagnostics)."""
        return [w.process.pid for w in self._all]


def _stop(worker: _Worker) -> None:
    with contextlib.suppress(OSError):
        worker.conn.close()
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=5.0)


async def _exchange(worker: _Worker, job: tuple[list[str], list[str]]) -> Reply:
    """Send one job and wait, without blocking the event loop, for its reply."""
    loop = asyncio.get_running_loop()
    # In a thread: a large job fills the pipe until the worker reads it.
    await loop.run_in_executor(None, worker.conn.send, job)
    ready: asyncio.Future[None] = loop.create_future()
    fd = worker.conn.fileno()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    reply: Reply = worker.conn.recv()
    return reply
