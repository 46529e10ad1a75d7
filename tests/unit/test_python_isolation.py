"""Python rewards: values float() cannot take fail naming the reward, and with
``isolation: process`` a function that hangs costs one worker restart, never the reward."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.config import PythonRewardConfig
from reward.base import RewardError
from reward.python_fn import PythonScorer


def huge(prompt: str, response: str) -> int:
    return 10**400  # float() overflows


def not_a_number(prompt: str, response: str) -> object:
    return {"score": 1}


def hang_on_request(prompt: str, response: str) -> float:
    if response == "hang":
        time.sleep(3600)
    return float(len(response))


def failing(prompt: str, response: str) -> float:
    return 1 / 0


async def async_length(prompt: str, response: str) -> float:
    await asyncio.sleep(0)
    return float(len(prompt) + len(response))


def scorer(function: str, isolation: str = "threads", timeout_s: float = 30.0) -> PythonScorer:
    return PythonScorer(PythonRewardConfig(
        name="verifier", type="python", function=f"{__name__}:{function}",
        isolation=isolation, timeout_s=timeout_s))  # type: ignore[arg-type]


@pytest.mark.parametrize("isolation", ["threads", "process"])
@pytest.mark.parametrize(("function", "type_name"), [("huge", "int"), ("not_a_number", "dict")])
async def test_a_value_float_cannot_take_fails_naming_the_reward(
        isolation: str, function: str, type_name: str) -> None:
    reward = scorer(function, isolation)
    await reward.start()
    try:
        with pytest.raises(RewardError, match=f"'verifier' returned {type_name}, not a number"):
            await reward.score(["p"], ["r"])
    finally:
        await reward.close()


async def test_process_isolation_scores_like_threads() -> None:
    threads, processes = scorer("async_length"), scorer("async_length", "process")
    await processes.start()
    try:
        pairs = (["ab", "c"], ["xyz", ""])
        assert await processes.score(*pairs) == await threads.score(*pairs) == [5.0, 1.0]
        with pytest.raises(RewardError, match="'verifier' failed: ZeroDivisionError"):
            failing_scorer = scorer("failing", "process")
            await failing_scorer.start()
            try:
                await failing_scorer.score(["p"], ["r"])
            finally:
                await failing_scorer.close()
    finally:
        await processes.close()


async def test_hung_workers_are_killed_at_the_timeout_and_replaced() -> None:
    # 3 s: a replacement worker is a fresh interpreter, slow to start on a loaded machine.
    reward = scorer("hang_on_request", "process", timeout_s=3.0)
    await reward.start()
    pool = reward._processes
    assert pool is not None
    try:
        before = set(pool.pids())
        # More hanging calls than workers: with threads this would hold every worker for good.
        hangs = reward.PROCESSES + 2
        for _ in range(hangs):
            started = time.monotonic()
            with pytest.raises(RewardError, match="did not answer within 3 s"):
                await reward.score(["p"], ["hang"])
            assert time.monotonic() - started < 15.0
        assert pool.restarts == hangs
        assert not before & set(pool.pids())  # every original worker was replaced
        assert await reward.score(["p", "p"], ["four", "xy"]) == [4.0, 2.0]
        # A caller that gives up (the guard's own deadline) also frees its worker.
        task = asyncio.ensure_future(reward.score(["p"], ["hang"]))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.restarts == hangs + 1
        assert await reward.score(["p"], ["ok"]) == [2.0]
    finally:
        await reward.close()
    assert pool.pids() == []


def test_isolation_is_validated() -> None:
    with pytest.raises(ValueError, match="isolation"):
        PythonRewardConfig(name="r", type="python", function="m:f",
                           isolation="fork")  # type: ignore[arg-type]
