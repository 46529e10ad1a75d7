"""How numbers that JSON cannot hold are read and written, in one place.

lambda = infinity (the base model) is spelled ``"inf"`` on output; on input ``inf``,
``infinity`` and ``off`` (any case) are accepted, and YAML's bare ``off`` (the boolean
false) too.
"""

from __future__ import annotations

import math
from typing import Any, Literal

INFINITY_SPELLINGS = frozenset({"inf", "infinity", "off"})


def parse_lambda(value: Any) -> Any:
    """Normalise a lambda given in configuration, a request or a command line.

    Returns ``math.inf`` for the spellings of infinity, a float for a numeric string, and
    anything else unchanged (so a schema can still refuse it with its own message).
    """
    if value is False:
        return math.inf
    if value is True:
        raise ValueError("lambda must be a number >= 0, 'inf' or 'off'")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INFINITY_SPELLINGS:
            return math.inf
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"lambda must be a number >= 0, 'inf' or 'off', not '{value}'") from None
    return value


def lambda_value(value: Any) -> float:
    """A checked lambda: a number >= 0 (infinity included), never NaN."""
    parsed = parse_lambda(value)
    if isinstance(parsed, bool) or not isinstance(parsed, int | float):
        raise ValueError(f"lambda must be a number >= 0, 'inf' or 'off', not {value!r}")
    number = float(parsed)
    if math.isnan(number) or number < 0:
        raise ValueError(f"lambda must be a number >= 0, 'inf' or 'off', not {value!r}")
    return number


def json_number(value: float) -> float | Literal["inf", "-inf"]:
    """A float for JSON output: infinities as ``"inf"`` / ``"-inf"`` (JSON has none)."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
