"""Static checks as part of the test command: ruff over everything, mypy over the typed core."""

from __future__ import annotations

import subprocess
import sys

from helpers import PACKAGES, REPO_ROOT


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    done = run_tool("ruff", "check", *PACKAGES, "tests")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_passes_on_the_typed_core() -> None:
    done = run_tool("mypy", *PACKAGES)
    assert done.returncode == 0, done.stdout[-4000:]
