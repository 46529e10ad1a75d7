"""Rule-based and verifiable rewards: any ``module:function`` taking (prompt, response).

The function receives the prompt as plain text and the response, and returns a number. An
``async def`` function is awaited; a plain one runs inline (keep it cheap) .
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
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
    """Calls a Python function once per (prompt, response)."""

    def __init__(self, config: PythonRewardConfig) -> None:
        self.name = config.name
        self._function = load_callable(config.function)
        self._is_async = inspect.iscoroutinefunction(self._function)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        values = []
        for prompt, response in zip(prompts, responses, strict=True):
            try:
                value = self._function(prompt_as_text(prompt), response)
                if self._is_async:
                    value = await value
                number = float(value)
            except Exception as exc:
                raise RewardError(f"reward '{self.name}' failed: {type(exc).__name__}") from exc
            if math.isnan(number):
                raise RewardError(f"reward '{self.name}' returned NaN")
            values.append(number)
        return values
