"""The per-request stop signal: the first of client gone, deadline and server abort wins,
the work is cancelled, and a disconnect reported while the server drains is ignored."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from server.errors import DeadlineExceeded, Unavailable
from server.stopping import AbortSignal, ClientGone, StopSignal


class Connection:
    """An ASGI ``receive`` whose disconnect the test sends when it wants."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.calls = 0

    async def receive(self) -> Message:
        self.calls += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


class Work:
    """Work that runs until cancelled (it records that) or until ``done`` is set."""

    def __init__(self) -> None:
        self.cancelled = False
        self.done = asyncio.Event()

    async def run(self) -> str:
        try:
            await self.done.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "result"


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_work_that_finishes_first_returns_its_result() -> None:
    stop = StopSignal(later(5), AbortSignal(), Connection().receive, lambda: False)
    work = Work()
    work.done.set()
    assert await stop.guard(work.run()) == "result"
    assert stop.reason is None
    await stop.close()


async def test_a_client_that_leaves_stops_the_work_at_once() -> None:
    connection = Connection()
    stop = StopSignal(later(5), AbortSignal(), connection.receive, lambda: False)
    work = Work()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, connection.gone.set)
    started = loop.time()
    with pytest.raises(ClientGone):
        await stop.guard(work.run())
    assert work.cancelled and loop.time() - started < 1.0  # event-driven: no poll interval
    assert connection.calls == 1
    await stop.close()


async def test_the_deadline_stops_the_work_with_a_timeout_error() -> None:
    stop = StopSignal(later(0.05), AbortSignal(), None, lambda: False)
    work = Work()
    with pytest.raises(DeadlineExceeded) as caught:
        await stop.guard(work.run())
    assert caught.value.code == "request_timeout" and work.cancelled
    await stop.close()


async def test_a_server_abort_reaches_every_request_with_its_error() -> None:
    abort = AbortSignal()
    stops = [StopSignal(later(5), abort, None, lambda: False) for _ in range(3)]
    works = [Work() for _ in stops]
    tasks = [asyncio.ensure_future(s.guard(w.run())) for s, w in zip(stops, works, strict=True)]
    await asyncio.sleep(0.01)
    error = Unavailable("shutting down", None, "server_shutting_down")
    abort.trigger(error)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results == [error] * 3 and all(w.cancelled for w in works)
    for stop in stops:
        assert await stop.wait() is error
        await stop.close()


async def test_a_disconnect_reported_while_draining_is_not_a_client_leaving() -> None:
    connection = Connection()
    draining = True
    stop = StopSignal(later(5), AbortSignal(), connection.receive, lambda: draining)
    work = Work()
    task = asyncio.ensure_future(stop.guard(work.run()))
    connection.gone.set()  # what uvicorn 0.43-0.44 reported to every request at shutdown
    await asyncio.sleep(0.05)
    assert not task.done() and stop.reason is None
    work.done.set()
    assert await task == "result"
    await stop.close()


async def test_the_first_reason_wins_and_close_stops_the_timer() -> None:
    stop = StopSignal(later(0.05), AbortSignal(), None, lambda: False)
    stop.stop(ClientGone())
    await asyncio.sleep(0.1)
    assert isinstance(stop.reason, ClientGone)
    closed = StopSignal(later(0.05), AbortSignal(), None, lambda: False)
    await closed.close()
    await asyncio.sleep(0.1)
    assert closed.reason is None
