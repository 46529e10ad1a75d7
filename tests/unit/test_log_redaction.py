"""Logs say where a reward failed, never what the client sent: the failure log of the
batching worker carries error types and frames, not messages."""

from __future__ import annotations

import json
import logging

import pytest

from reward.base import RewardError
from reward.batching import BatchWorker
from server.logs import JSONFormatter

SECRET_INPUT = "my card number is 4111-1111-1111-1111"


def tokenizer_that_quotes_its_input(items: list[str]) -> list[float]:
    try:
        raise KeyError(f"unknown token in {items[0]!r}")
    except KeyError as inner:
        raise ValueError(f"cannot encode {items[0]!r}") from inner


async def test_a_scoring_failure_is_logged_without_the_input(
        caplog: pytest.LogCaptureFixture) -> None:
    worker: BatchWorker[str] = BatchWorker("rm", 0, tokenizer_that_quotes_its_input)
    worker.start()
    try:
        with caplog.at_level(logging.ERROR, logger="reward.batching"), \
                pytest.raises(RewardError, match="failed: ValueError"):
            await worker.submit([SECRET_INPUT])
    finally:
        await worker.close()
    (record,) = [r for r in caplog.records if r.getMessage() == "reward scoring failed"]
    line = JSONFormatter().format(record)
    assert "4111" not in line and "4111" not in caplog.text
    logged = json.loads(line)
    assert logged["error"] == "ValueError <- KeyError"
    assert "tokenizer_that_quotes_its_input" in logged["traceback"]  # where it happened
    assert record.exc_info is None
