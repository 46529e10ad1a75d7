"""The shared test helpers: the tier of a test file, the repository root, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TESTS_ROOT, free_port, tier_of


def test_the_tier_is_the_folder_under_tests() -> None:
    assert tier_of(TESTS_ROOT / "unit" / "test_loop.py") == "unit"
    assert tier_of(TESTS_ROOT / "api" / "test_streaming.py") == "api"
    assert tier_of(TESTS_ROOT / "e2e" / "sub" / "test_x.py") == "e2e"


@pytest.mark.parametrize("path", [
    TESTS_ROOT / "test_top_level.py",
    TESTS_ROOT / "slow" / "test_x.py",
    REPO_ROOT / "engine" / "sbon.py",
])
def test_a_file_outside_every_tier_folder_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="tests"):
        tier_of(path)


def test_the_repository_root_holds_the_packages_and_config() -> None:
    assert (REPO_ROOT / "config.yaml").is_file() and (REPO_ROOT / "pyproject.toml").is_file()
    assert (REPO_ROOT / "engine" / "sbon.py").is_file()


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
