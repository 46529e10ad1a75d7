"""The batching worker of the in-process reward models, over a plain scoring function."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from reward.base import RewardError
from reward.batching import BatchWorker


class Recorder:
    """A scoring function that records its batches; a "poison" item fails a batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[str]) -> list[float]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if "poison" in items:
            raise RuntimeError("the model cannot take 'poison'")
        return [float(len(item)) for item in items]


async def started(score: Recorder, batch_wait_ms: float = 50) -> BatchWorker[str]:
    worker: BatchWorker[str] = BatchWorker("rm", batch_wait_ms, score)
    worker.start()
    return worker


async def test_concurrent_submits_share_one_call_and_get_their_own_values() -> None:
    score = Recorder()
    worker = await started(score)
    try:
        first, second, third = await asyncio.gather(
            worker.submit(["a", "bb"]), worker.submit(["ccc"]), worker.submit(["dddd", "e"]))
    finally:
        await worker.close()
    assert score.batches == [["a", "bb", "ccc", "dddd", "e"]]
    assert (first, second, third) == ([1.0, 2.0], [3.0], [4.0, 1.0])
    assert all(name.startswith("reward-rm") for name in score.threads)


async def test_a_failed_shared_batch_is_retried_request_by_request(
        caplog: pytest.LogCaptureFixture) -> None:
    score = Recorder()
    worker = await started(score)
    try:
        with caplog.at_level(logging.WARNING, logger="reward.batching"):
            good, bad, other = await asyncio.gather(
                worker.submit(["fine"]), worker.submit(["x", "poison"]), worker.submit(["ok"]),
                return_exceptions=True)
    finally:
        await worker.close()
    assert score.batches[0] == ["fine", "x", "poison", "ok"]
    assert sorted(map(tuple, score.batches[1:])) == [("fine",), ("ok",), ("x", "poison")]
    assert good == [4.0] and other == [2.0]
    assert isinstance(bad, RewardError)
    assert str(bad) == "reward 'rm' failed: RuntimeError"  # the input is not quoted back
    assert "one by one" in caplog.text and "reward scoring failed" in caplog.text


async def test_a_failure_reaches_only_its_own_caller_and_the_worker_keeps_serving() -> None:
    def score(items: list[str]) -> list[float]:
        if "bad" in items:
            raise RewardError("reward 'rm': the item is bad")
        return [1.0] * len(items)

    worker: BatchWorker[str] = BatchWorker("rm", 0, score)
    worker.start()
    try:
        with pytest.raises(RewardError, match="the item is bad"):  # a RewardError as it is
            await worker.submit(["bad"])
        assert worker.healthy
        assert await worker.submit(["a", "b"]) == [1.0, 1.0]
        assert await worker.submit([]) == []
    finally:
        await worker.close()


async def test_a_cancelled_request_is_left_out_of_the_batch() -> None:
    score = Recorder()
    worker = await started(score)
    try:
        gone = asyncio.create_task(worker.submit(["gone"]))
        await asyncio.sleep(0)
        gone.cancel()
        assert await worker.submit(["kept"]) == [4.0]
    finally:
        await worker.close()
    assert score.batches == [["kept"]]


async def test_close_fails_waiting_and_running_requests_and_refuses_later_ones() -> None:
    release = threading.Event()

    def slow(items: list[str]) -> list[float]:
        release.wait(5)
        return [0.0] * len(items)

    worker: BatchWorker[str] = BatchWorker("rm", 0, slow)
    worker.start()
    running = asyncio.create_task(worker.submit(["first"]))
    await asyncio.sleep(0.05)  # "first" is being scored on the worker thread
    waiting = asyncio.create_task(worker.submit(["second"]))
    await asyncio.sleep(0)
    try:
        await worker.close()
        for task in (running, waiting):
            with pytest.raises(RewardError, match="reward 'rm' is closed"):
                await asyncio.wait_for(task, 1)
        assert not worker.healthy
        with pytest.raises(RewardError, match="closed"):
            await worker.submit(["later"])
    finally:
        release.set()


async def test_a_worker_not_started_is_not_loaded() -> None:
    worker: BatchWorker[str] = BatchWorker("rm", 0, Recorder())
    assert not worker.healthy
    with pytest.raises(RewardError, match="reward 'rm' is not loaded"):
        await worker.submit(["a"])
    await worker.close()  # closing a worker that never started is fine


async def test_run_uses_the_scoring_thread() -> None:
    score = Recorder()
    worker = await started(score, batch_wait_ms=0)
    try:
        name = await worker.run(lambda: threading.current_thread().name)
        await worker.submit(["a"])
    finally:
        await worker.close()
    assert score.threads == {name}


async def test_a_device_error_that_sticks_fails_the_batch_and_marks_the_worker_dead() -> None:
    import torch

    calls: list[list[str]] = []

    def broken_device(items: list[str]) -> list[float]:
        calls.append(list(items))
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    worker: BatchWorker[str] = BatchWorker("rm", 50, broken_device)
    worker.start()
    try:
        assert worker.healthy
        results = await asyncio.gather(worker.submit(["a"]), worker.submit(["b"]),
                                       return_exceptions=True)
        assert all(isinstance(r, RewardError) for r in results)
        assert calls == [["a", "b"]]  # no retry one by one: the device is gone for all
        assert not worker.healthy
        with pytest.raises(RewardError, match="device failed"):
            await worker.submit(["later"])
    finally:
        await worker.close()


async def test_an_ordinary_model_error_leaves_the_worker_healthy() -> None:
    worker = await started(Recorder(), batch_wait_ms=0)
    try:
        with pytest.raises(RewardError):
            await worker.submit(["poison"])
        assert worker.healthy
        assert await worker.submit(["ok"]) == [2.0]
    finally:
        await worker.close()
