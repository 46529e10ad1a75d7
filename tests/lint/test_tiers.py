"""Test tiers come from folders: ``-m <tier>`` selects exactly the tests under ``tests/<tier>``.

The root ``conftest.py`` marks every test with the tier of its folder, so no file marks
itself and no test can be left out of every tier.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TESTS_ROOT, TIERS

# Collects the suite with ``-m unit`` and prints, for every test, whether ``-m`` kept it and
# which tier markers it carries. One collection in a fresh process covers every tier.
REPORTER = """
import json, sys, pytest
TIERS = set(json.loads(sys.argv[1]))
class Reporter:
    def __init__(self):
        self.items = []
    def pytest_deselected(self, items):
        self.items += [(i, False) for i in items]
    def pytest_collection_finish(self, session):
        self.items += [(i, True) for i in session.items]
reporter = Reporter()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "unit"],
                   plugins=[reporter])
rows = [[i.nodeid, kept, sorted({m.name for m in i.iter_markers()} & TIERS)]
        for i, kept in reporter.items]
print("ROWS " + json.dumps(rows))
sys.exit(int(code))
"""


@pytest.fixture(scope="module")
def collection() -> list[tuple[str, bool, list[str]]]:
    """Every test of the suite: node id, kept by ``-m unit``, its tier markers."""
    done = subprocess.run([sys.executable, "-c", REPORTER, json.dumps(TIERS)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ROWS "))
    return [(nodeid, kept, tiers) for nodeid, kept, tiers in json.loads(line[len("ROWS "):])]


def folder_tier(nodeid: str) -> str:
    return Path(nodeid.split("::")[0]).parts[1]


def test_tiers_are_the_registered_markers_and_the_test_folders() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pytest_options = config["tool"]["pytest"]["ini_options"]
    markers = {line.split(":")[0].strip() for line in pytest_options["markers"]}
    assert markers == set(TIERS)
    assert "--strict-markers" in pytest_options["addopts"].split()
    folders = {path.parent.name for path in TESTS_ROOT.glob("*/test_*.py")}
    assert folders == set(TIERS)
    assert not list(TESTS_ROOT.glob("test_*.py")), "a test file outside every tier folder"


def _marks_a_tier(node: ast.AST) -> bool:
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            return True
    return (isinstance(node, ast.Attribute) and node.attr in TIERS
            and isinstance(node.value, ast.Attribute) and node.value.attr == "mark")


def test_no_test_file_marks_its_own_tier() -> None:
    offenders = [str(path.relative_to(REPO_ROOT)) for path in sorted(TESTS_ROOT.rglob("*.py"))
                 if any(_marks_a_tier(node) for node in ast.walk(ast.parse(path.read_text())))]
    assert offenders == []


def test_the_own_tier_check_sees_both_spellings() -> None:
    assert any(_marks_a_tier(n) for n in ast.walk(ast.parse("pytestmark = pytest.mark.unit")))
    decorated = "@pytest.mark.api\ndef test_x():\n    pass\n"
    assert any(_marks_a_tier(n) for n in ast.walk(ast.parse(decorated)))
    assert not any(_marks_a_tier(n) for n in ast.walk(ast.parse("@pytest.mark.parametrize\n"
                                                                  "def test_x():\n    pass\n")))


def test_every_test_carries_exactly_the_tier_of_its_folder(
    collection: list[tuple[str, bool, list[str]]],
) -> None:
    assert len(collection) > 100  # the whole suite was collected
    assert {folder_tier(nodeid) for nodeid, _, _ in collection} == set(TIERS)
    wrong = [(nodeid, tiers) for nodeid, _, tiers in collection
             if tiers != [folder_tier(nodeid)]]
    assert wrong == []


def test_minus_m_selects_exactly_the_tier_folder(
    collection: list[tuple[str, bool, list[str]]],
) -> None:
    kept = {nodeid for nodeid, was_kept, _ in collection if was_kept}
    assert kept and kept == {nodeid for nodeid, _, _ in collection
                             if folder_tier(nodeid) == "unit"}
