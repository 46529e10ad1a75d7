"""Rule-based and verifiable rewards: any ``module:function`` taking (prompt, response).

The function receives the prompt as plain text and the response, and returns a number; it
may return ``-inf`` to mean "never choose this response" (a failed check), which gives the
candidate selection weight 0 (engine/guarded.py). Any other non-finite value fails the
request with a 503 naming the reward. A plain function runs on a small pool of worker
threads, never on the event loop; an ``async def`` function is awaited on the loop and must
not block it. The reward's ``timeout_s`` bounds every scoring call. With ``bounds``
configured, the scorer is a :class:`BoundedPythonScorer` (a ``BoundedScorer``).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.config import PythonRewardConfig
from common.prompts import Prompt, prompt_as_text
from reward.base import RewardBounds, RewardError, check_lengths
from reward.callables import as_float, load_callable
from reward.python_process import ProcessPool


class PythonScorer:
    """Calls a Python function once per (prompt, response), off the event loop."""

    never_choose_negative_infinity = True  # -inf = never choose (module docstring)
    reuses_prefix_cache = False
    healthy = True  # a failing function fails its requests; nothing here dies for good
    WORKERS = 4  # a function that hangs holds one worker; the timeout frees its request
    PROCESSES = 2  # isolation: process; a hung one is killed at timeout_s and replaced

    def __init__(self, config: PythonRewardConfig) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s
        self._function = load_callable(config.function)
        self._processes = ProcessPool(config.name, config.function, self.PROCESSES,
                                      config.timeout_s) if config.isolation == "process" else None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._processes is not None:
            await self._processes.start()

    async def close(self) -> None:
        if self._processes is not None:
            await self._processes.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if self._processes is not None:
            check_lengths(prompts, responses)
            return await self._processes.call([prompt_as_text(p) for p in prompts],
                                              list(responses))
        values = await self._call_pairs(self._function, prompts, responses)
        return [self._number(v) for v in values]

    def _call_all(self, texts: list[str], responses: list[str],
                  function: Callable[..., Any] | None = None) -> list[Any]:
        call = function or self._function
        try:
            return [call(t, r) for t, r in zip(texts, responses, strict=True)]
        except Exception as exc:
            raise RewardError(f"reward '{self.name}' failed: {type(exc).__name__}") from exc

    async def _call_pairs(self, function: Callable[..., Any], prompts: Sequence[Prompt],
                          responses: Sequence[str]) -> list[Any]:
        """``function`` over the pairs: awaited when async, else on the worker threads."""
        check_lengths(prompts, responses)
        texts = [prompt_as_text(p) for p in prompts]
        if inspect.iscoroutinefunction(function):
            try:
                return [await function(t, r) for t, r in zip(texts, responses, strict=True)]
            except Exception as exc:
                raise RewardError(f"reward '{self.name}' failed: {type(exc).__name__}") from exc
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.WORKERS,
                                                thread_name_prefix=f"reward-{self.name}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call_all, texts,
                                          list(responses), function)

    def _number(self, value: Any) -> float:
        """The value as a float; whether it is allowed is the guard's decision."""
        try:
            return as_float(value)
        except ValueError as exc:  # 10**400 overflows: a 503 naming the reward, not a 500
            raise RewardError(f"reward '{self.name}' {exc}") from exc


class BoundedPythonScorer(PythonScorer):
    """A python reward with a ``bounds`` companion: a declared :class:`BoundedScorer`.

    The companion takes (prompt text, partial response) and returns (lower, upper), bounds on
    the final reward of every completion of the partial response. NaN, ``lower > upper`` or
    ``lower = +inf`` are the reward's failure (a 503 naming it), as bad rewards are.
    """

    def __init__(self, config: PythonRewardConfig) -> None:
        super().__init__(config)
        if config.bounds is None:
            raise ValueError(f"reward '{config.name}': no bounds function is configured")
        self._bounds = load_callable(config.bounds)

    async def bounds(self, prompts: Sequence[Prompt],
                     partial_responses: Sequence[str]) -> list[RewardBounds]:
        values = await self._call_pairs(self._bounds, prompts, partial_responses)
        return [self._bound_pair(v) for v in values]

    def _bound_pair(self, value: Any) -> RewardBounds:
        try:
            lower, upper = (float(v) for v in value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RewardError(f"reward '{self.name}': bounds must be a (lower, upper) pair of "
                              f"numbers, not {type(value).__name__}") from exc
        if math.isnan(lower) or math.isnan(upper) or lower > upper or lower == math.inf:
            raise RewardError(f"reward '{self.name}': invalid bounds ({lower}, {upper})")
        return RewardBounds(lower, upper)


def python_scorer(config: PythonRewardConfig) -> PythonScorer:
    """The scorer for ``config``: bounded exactly when a bounds function is configured."""
    return BoundedPythonScorer(config) if config.bounds else PythonScorer(config)
