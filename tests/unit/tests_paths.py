"""Paths shared by the unit tests."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
