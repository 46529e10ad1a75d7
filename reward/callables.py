"""What a ``python`` reward's function is: imported once from ``package.module:function``,
and its return values taken as floats (a value float() cannot take is the reward's failure,
never a 500).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


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
    function: Callable[..., Any] = target
    return function


def as_float(value: Any) -> float:
    """``value`` as a float, or ValueError naming its type (a huge int overflows float)."""
    try:
        return float(value)
    except Exception as exc:  # TypeError, ValueError, OverflowError, or a broken __float__
        raise ValueError(f"returned {type(value).__name__}, not a number") from exc
