"""Paths and small utilities shared by every test tier.

``tests/`` is on ``sys.path`` (it holds the root ``conftest.py``), so any test module can
``from helpers import REPO_ROOT, free_port``.
"""

from __future__ import annotations

import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository's root folder: where ``config.yaml`` and the packages live."""

PACKAGES = ("common", "reward", "engine", "server", "bench", "cli")
"""The project's own top-level packages."""

TESTS_ROOT = REPO_ROOT / "tests"

TIERS = ("unit", "api", "integration", "e2e", "lint", "docker")
"""Test tiers: each is a folder under ``tests/`` and the marker of the tests in it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tier_of(path: Path) -> str:
    """The tier of a test file: the name of its folder right under ``tests/``.

    Raises ``ValueError`` for a file outside every tier folder, so no test can escape the
    ``-m <tier>`` selections by being left unmarked.
    """
    try:
        relative = path.resolve().relative_to(TESTS_ROOT)
    except ValueError:
        raise ValueError(f"{path} is not under {TESTS_ROOT}") from None
    if len(relative.parts) < 2 or relative.parts[0] not in TIERS:
        folders = ", ".join(f"tests/{tier}" for tier in TIERS)
        raise ValueError(f"{path}: a test file must live in one of {folders}")
    return relative.parts[0]
