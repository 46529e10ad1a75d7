"""Rule-based and verifiable rewards: any ``module:function`` taking (prompt, response).

The function receives the prompt as plain text and the response, and returns a number; it
may return ``-inf`` to mean "never choose this response" (a failed check), which gives the
candidate selection weight 0 (engine/guarded.py). Any other non-finite value fails the
request with a 503 naming the reward. A plain function runs on a small pool of worker
threads, never on the event loop; an ``async def`` function is awaited on the loop and must
not block it. The reward's ``timeout_s`` bounds every scoring call.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.config import PythonRewardConfig
from common.prompts import Prompt, prompt_as_text
from reward.base import RewardError, check_lengths


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"'{spec}' is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import '{module_name}' for reward function '{spec}'") from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"'{spec}': '{attribute}' not found in '{module_name}'")
    if not callable(target):
        raise ValueError(f"'{spec}' is not callable")
    return target


class PythonScorer:
    """Calls a Python function once per (prompt, response), off the event loop."""

    never_choose_negative_infinity = True  # -inf = never choose (module docstring)
    WORKERS = 4  # a function that hangs holds one worker; the timeout frees its request

    def __init__(self, config: PythonRewardConfig) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s
        self._function = load_callable(config.function)
        self._is_async = inspect.iscoroutinefunction(self._function)
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        texts = [prompt_as_text(p) for p in prompts]
        if self._is_async:
            try:
                values = [await self._function(t, r)
                          for t, r in zip(texts, responses, strict=True)]
            except Exception as exc:
                raise RewardError(f"reward '{self.name}' failed: {type(exc).__name__}") from exc
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.WORKERS,
                                                    thread_name_prefix=f"reward-{self.name}")
            loop = asyncio.get_running_loop()
            values = await loop.run_in_executor(self._executor, self._call_all, texts,
                                                list(responses))
        return [self._number(v) for v in values]

    def _call_all(self, texts: list[str], responses: list[str]) -> list[Any]:
        try:
            return [self._function(t, r) for t, r in zip(texts, responses, strict=True)]
        except Exception as exc:
            raise RewardError(f"reward '{self.name}' failed: {type(exc).__name__}") from exc

    def _number(self, value: Any) -> float:
        """The value as a float; whether it is allowed is the guard's decision."""
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward '{self.name}' returned {type(value).__name__}, "
                              "not a number") from exc
