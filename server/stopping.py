"""One stop signal per request: its client left, its deadline passed, or the server aborts.

Event-driven, as vLLM's ``with_cancellation`` (vllm/entrypoints/utils.py): a listener
awaits the ASGI ``receive()`` for ``http.disconnect``, a timer fires at the deadline, and a
server-wide :class:`AbortSignal` (engine death, the end of a drain) reaches every request.
Streaming and non-streaming requests share it. While the server drains, a disconnect that
uvicorn itself reports for its shutdown (0.43-0.44 did) is not taken for a client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Receive

from server.errors import APIError, DeadlineExceeded

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


@dataclass
class AbortSignal:
    """A server-wide "stop now" with the error every request still running answers with."""

    reason: APIError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def trigger(self, reason: APIError) -> None:
        if self.reason is None:
            self.reason = reason
            self.event.set()


def request_timed_out() -> DeadlineExceeded:
    return DeadlineExceeded("The request did not finish within the server's time limit "
                            "(limits.request_timeout_s); its work was stopped.", None,
                            "request_timeout")


class StopSignal:
    """Why one request must stop now, set once by whichever comes first.

    ``deadline`` is event-loop time; ``receive`` is the request's ASGI receive (None: no
    listener); ``draining`` says whether a server shutdown is under way.
    """

    def __init__(self, deadline: float, abort: AbortSignal, receive: Receive | None,
                 draining: Callable[[], bool]) -> None:
        self.reason: BaseException | None = None
        self._event = asyncio.Event()
        self._draining = draining
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(deadline, self.stop, request_timed_out())
        self._tasks = [asyncio.create_task(self._watch_abort(abort), name="sbon-abort-watch")]
        if receive is not None:
            self._tasks.append(asyncio.create_task(self._listen(receive), name="sbon-listen"))

    def stop(self, reason: BaseException) -> None:
        """Set the reason (the first one wins) and wake everything waiting on it."""
        if self.reason is None:
            self.reason = reason
            self._event.set()

    async def wait(self) -> BaseException:
        """Wait until the request must stop; return why."""
        await self._event.wait()
        assert self.reason is not None
        return self.reason

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the request must stop first: then ``work`` is cancelled
        (and so its engine requests) and the reason is raised."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            assert self.reason is not None
            raise self.reason
        finally:
            await cancel_all([task, stopped])

    async def close(self) -> None:
        """Stop listening and timing (the request is over)."""
        self._timer.cancel()
        await cancel_all(self._tasks)

    async def _watch_abort(self, abort: AbortSignal) -> None:
        await abort.event.wait()
        assert abort.reason is not None
        self.stop(abort.reason)

    async def _listen(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.disconnect":
                continue  # the body was read already; nothing else is expected
            if not self._draining():
                self.stop(ClientGone())
            # Draining: uvicorn may report its own shutdown as a disconnect; the drain's
            # end (an AbortSignal) bounds the request instead.
            return


async def cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (whatever it ended with)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
