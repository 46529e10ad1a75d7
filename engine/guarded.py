"""Every reward's scores pass through here: a deadline, finite values, and a health record.

One rule for values that are not finite numbers: NaN and +inf are a reward failure (a 503
naming the reward), and so is -inf, unless the scorer declares
``never_choose_negative_infinity`` True (reward/base.py) (the ``python`` reward does, see
:mod:`reward.python_fn`): then -inf means "never choose this candidate", it gets selection
weight 0 (:func:`engine.selection.selection_weights`) and is rendered as ``"-inf"``. A block
whose candidates are all refused that way is a failure too. A scoring call that outlives
the scorer's ``timeout_s`` is a failure (its work is cancelled: engine requests are aborted).
Engine errors pass through unchanged: they are the engine's (503), not the reward's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from common.prompts import Prompt
from engine.backend import BackendError
from reward.base import (
    BlockQuery,
    BoundedScorer,
    RewardBounds,
    RewardError,
    RewardScorer,
    Scores,
    score_block,
)

logger = logging.getLogger(__name__)


FailureKind = Literal["timeout", "invalid", "error"]
T = TypeVar("T")


class RewardFailure(RewardError):
    """A reward could not score a request: it failed, timed out or gave a non-finite value.

    ``reward`` names it for the client; ``kind`` says which of the three happened. The
    underlying error, if any, is the ``__cause__`` (logged, never sent to clients).
    """

    def __init__(self, reward: str, kind: FailureKind, detail: str) -> None:
        super().__init__(f"reward '{reward}': {detail}")
        self.reward = reward
        self.kind = kind
        self.detail = detail


@dataclass
class RewardHealth:
    """What ``/health`` says about one reward."""

    calls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    in_flight: int = 0
    last_failure: FailureKind | None = None
    last_failure_at: float | None = None  # time.time()

    def as_dict(self, healthy: bool) -> dict[str, Any]:
        state = "dead" if not healthy else "ok" if self.consecutive_failures == 0 else "failing"
        return {"state": state, "calls": self.calls, "failures": self.failures,
                "consecutive_failures": self.consecutive_failures, "in_flight": self.in_flight,
                "last_failure": self.last_failure, "last_failure_at": self.last_failure_at}


class GuardedScorer:
    """A scorer with the deadline, the finite-value rule and a health record around it."""

    def __init__(self, inner: RewardScorer, timeout_s: float | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.timeout_s = float(timeout_s if timeout_s is not None else inner.timeout_s)
        self.never_choose_negative_infinity = inner.never_choose_negative_infinity
        self.reuses_prefix_cache = inner.reuses_prefix_cache
        self.health = RewardHealth()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def healthy(self) -> bool:
        """False when the scorer says it cannot serve (an engine or worker that died)."""
        return self.inner.healthy

    def status(self) -> dict[str, Any]:
        return self.health.as_dict(self.healthy)

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        values = await self._call(self.inner.score(prompts, responses))
        return self.check(values, len(responses))

    async def score_block(self, query: BlockQuery) -> Scores:
        scores = await self._call(score_block(self.inner, query))
        rewards = self.check(scores.rewards, len(query.block_texts))
        return dataclasses.replace(scores, rewards=rewards)

    async def score_some(self, query: BlockQuery) -> Scores:
        """:meth:`score_block` for part of a selection (or partial responses), where every
        value may be -inf; the caller checks the whole selection."""
        scores = await self._call(score_block(self.inner, query))
        rewards = self.check(scores.rewards, len(query.block_texts), some_choosable=False)
        return dataclasses.replace(scores, rewards=rewards)

    @property
    def has_bounds(self) -> bool:
        """Whether the reward bounds final rewards of partial responses (``bound`` pruning)."""
        return isinstance(self.inner, BoundedScorer)

    async def reward_bounds(self, prompts: Sequence[Prompt],
                            partial_responses: Sequence[str]) -> list[RewardBounds]:
        """The reward's bounds under the same deadline and health record as its scores.

        Not named ``bounds``: the guard itself must not pass for a :class:`BoundedScorer`.
        """
        inner = self.inner
        if not isinstance(inner, BoundedScorer):
            raise TypeError(f"reward '{self.name}' declares no bounds")
        values = await self._call(inner.bounds(prompts, partial_responses))
        if len(values) != len(partial_responses) or any(
                math.isnan(b.lower) or math.isnan(b.upper) or b.lower > b.upper
                for b in values):
            raise self._failed("invalid", "bounds that are not (lower <= upper) pairs")
        return list(values)

    async def _call(self, work: Awaitable[T]) -> T:
        health = self.health
        health.calls += 1
        health.in_flight += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await work
        except TimeoutError:
            raise self._failed("timeout", f"no answer within {self.timeout_s:g} s") from None
        except BackendError:
            raise  # the engine's failure, reported as such
        except RewardError as exc:
            raise self._failed("error", "failed", exc) from exc
        except asyncio.CancelledError:
            raise
        except Exception:
            self._record("error")
            raise  # a bug: the server answers a generic 500 and logs the traceback
        finally:
            health.in_flight -= 1
        return result

    def check(self, values: Sequence[Any], expected: int, *,
              some_choosable: bool = True) -> list[float]:
        """The rewards as floats, or a failure when one is not allowed (module docstring).

        ``some_choosable=False`` accepts -inf for every value: partial responses scored at a
        pruning checkpoint, or part of a selection's candidates (engine/pruned.py).
        """
        if len(values) != expected:
            raise self._failed("invalid", f"{len(values)} values for {expected} responses")
        out: list[float] = []
        for value in values:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise self._failed("invalid", "a value that is not a number") from None
            if math.isnan(number) or number == math.inf or (
                    number == -math.inf and not self.never_choose_negative_infinity):
                raise self._failed("invalid", f"the non-finite value {number}")
            out.append(number)
        if some_choosable and out and all(v == -math.inf for v in out):
            raise self._failed("invalid", "-inf (never choose) for every candidate")
        self.health.consecutive_failures = 0
        return out

    def _record(self, kind: FailureKind) -> None:
        health = self.health
        health.failures += 1
        health.consecutive_failures += 1
        health.last_failure, health.last_failure_at = kind, time.time()

    def _failed(self, kind: FailureKind, detail: str,
                cause: BaseException | None = None) -> RewardFailure:
        self._record(kind)
        logger.warning("reward failed", extra={
            "reward": self.name, "kind": kind, "detail": detail,
            "error": f"{type(cause).__name__}: {cause}" if cause is not None else None})
        return RewardFailure(self.name, kind, detail)


def guard(scorer: RewardScorer, timeout_s: float | None = None) -> GuardedScorer:
    """``scorer`` behind a guard (itself if it already is one)."""
    if isinstance(scorer, GuardedScorer):
        return scorer
    return GuardedScorer(scorer, timeout_s)
