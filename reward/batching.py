"""Cross-request micro-batching for reward models that score on one worker thread.

A reward model loaded in the serving process (reward/hf.py, reward/prm.py) scores one large
batch faster than many small ones, and must not block the event loop while it does.
:class:`BatchWorker` gathers the requests that arrive within ``batch_wait_ms`` into one shared
batch, scores it on a single worker thread and hands each request its own slice of the values.
When a shared batch fails, each of its requests is scored again on its own, so that one
client's input that breaks the model fails that client's request only. Failures reach the
caller as :class:`~reward.base.RewardError` naming the reward.

Timeouts are not applied here: the reward's ``timeout_s`` bounds every call from outside
(engine/guarded.py). A request whose caller gave up is cancelled; it is left out of the
batches still to come, and a batch it was already part of no longer answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from reward.base import RewardError

ItemT = TypeVar("ItemT")
T = TypeVar("T")

_logger = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[ItemT]):
    """One request waiting for its values: its items, in order, and the caller's future."""

    items: list[ItemT]
    future: asyncio.Future[list[float]]


class BatchWorker(Generic[ItemT]):
    """Batches concurrent requests for ``score_items``, run on a worker thread of its own.

    ``score_items`` takes the items of every request in a batch, in order, and returns one
    value per item; it runs on a single thread, so it is never called twice at once. Use
    :meth:`run` for other work that must run on that same thread (loading the model).
    """

    def __init__(self, name: str, batch_wait_ms: float,
                 score_items: Callable[[list[ItemT]], list[float]],
                 logger: logging.Logger | None = None) -> None:
        """``name`` is the reward's name (in errors, logs and the thread's name); a batch
        waits ``batch_wait_ms`` after its first request for others to join it; ``logger``
        is the one failures are reported on (this module's by default)."""
        self.name = name
        self._batch_wait_s = batch_wait_ms / 1000.0
        self._score_items = score_items
        self._logger = logger or _logger
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")
        self._queue: asyncio.Queue[_Pending[ItemT]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._device_failed = False  # a device error that sticks: nothing scores again

    async def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the worker thread (the one that scores) and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def start(self) -> None:
        """Start taking requests: the serving task runs on the current event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve(), name=f"reward-{self.name}")

    async def close(self) -> None:
        """Stop serving: requests still waiting (or in the batch being scored) fail with a
        RewardError, later ones are refused, and the worker thread is shut down."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._queue is not None:
            while not self._queue.empty():
                self._abandon([self._queue.get_nowait()])

    @property
    def healthy(self) -> bool:
        """Started, its serving task still running, and its device usable."""
        return (self._worker is not None and not self._worker.done()
                and not self._device_failed)

    def check_open(self) -> None:
        """Raise a RewardError unless requests are taken (started and not closed)."""
        if self._queue is None:
            raise RewardError(f"reward '{self.name}' is not loaded")
        if self._closed:
            raise RewardError(f"reward '{self.name}' is closed")
        if self._device_failed:
            raise RewardError(f"reward '{self.name}': its device failed; restart the server")

    async def submit(self, items: Sequence[ItemT]) -> list[float]:
        """The values of ``items``, in order, scored in a batch shared with other requests."""
        self.check_open()
        assert self._queue is not None
        if not items:
            return []
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(list(items), future))
        return await future

    async def _serve(self) -> None:
        """Gather what arrives within ``batch_wait_ms`` into one batch, and score it."""
        assert self._queue is not None
        while True:
            pending = [await self._queue.get()]
            try:
                if self._batch_wait_s > 0:
                    await asyncio.sleep(self._batch_wait_s)
                while not self._queue.empty():
                    pending.append(self._queue.get_nowait())
                pending = [p for p in pending if not p.future.cancelled()]
                if pending:
                    await self._run_batch(pending)
            except asyncio.CancelledError:
                self._abandon(pending)
                raise

    async def _run_batch(self, pending: list[_Pending[ItemT]]) -> None:
        """Score one shared batch; if it fails, score each request on its own, so that one
        client's input that breaks the model fails that client's request only."""
        items = [item for p in pending for item in p.items]
        try:
            values = await self.run(lambda: self._score_items(items))
        except Exception as exc:
            if is_sticky_device_error(exc):
                self._device_failed = True  # healthy turns False: the server restarts
            if len(pending) == 1 or self._device_failed:
                for one in pending:
                    self._fail(one, exc)
                return
            self._logger.warning("a shared reward batch failed; scoring its requests one by one",
                                 extra={"reward": self.name, "requests": len(pending)})
            for one in pending:
                if not one.future.done():
                    await self._run_batch([one])
            return
        offset = 0
        for p in pending:
            if not p.future.done():
                p.future.set_result(values[offset : offset + len(p.items)])
            offset += len(p.items)

    def _fail(self, pending: _Pending[ItemT], exc: Exception) -> None:
        """Fail one request: a RewardError as it is, any other error as a RewardError that
        names the reward and the error's type (its message may quote the client's input)."""
        error = exc if isinstance(exc, RewardError) else RewardError(
            f"reward '{self.name}' failed: {type(exc).__name__}")
        if not pending.future.done():
            pending.future.set_exception(error)
        self._logger.error("reward scoring failed", extra={"reward": self.name,
                                                           **redacted_traceback(exc)})

    def _abandon(self, pending: list[_Pending[ItemT]]) -> None:
        """Fail requests that will not be scored because the worker is closing."""
        for p in pending:
            if not p.future.done():
                p.future.set_exception(RewardError(f"reward '{self.name}' is closed"))


def redacted_traceback(exc: BaseException) -> dict[str, str]:
    """Where an error happened, without what it says: the types of the error and its causes,
    and the frames (file, line, code). Messages are left out, since a tokenizer's or a
    model's error may quote the client's input."""
    chain: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return {"error": " <- ".join(chain), "traceback": frames}


def is_sticky_device_error(exc: BaseException) -> bool:
    """A CUDA (accelerator) error: after one the device context is unusable until the
    process restarts (PyTorch raises ``torch.AcceleratorError`` for them). Out-of-memory
    errors are a different type and pass."""
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    return torch is not None and isinstance(exc, torch.AcceleratorError)


class BatchedModelScorer(Generic[ItemT]):
    """The life cycle shared by scorers that run a model on a :class:`BatchWorker`.

    A subclass sets ``self._batcher`` and implements ``_load`` (run on the scoring thread,
    so the model lives on the thread that uses it).
    """

    _batcher: BatchWorker[ItemT]
    never_choose_negative_infinity = False  # -inf from a model is a failure
    reuses_prefix_cache = False  # transformers in the process: no vLLM prefix cache

    def _load(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self._batcher.run(self._load)  # on the thread that will score
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    @property
    def healthy(self) -> bool:
        """Loaded, and its batching worker still running."""
        return self._batcher.healthy
