"""Registers the measurement subcommands (``sbon bench`` and ``sbon eval``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_measure_commands(
    sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Measurement commands are added here once they exist."""
    return None
