"""Rules for the tests themselves: an expected failure names its exception type.

``pytest.raises(Exception)`` passes on any error at all, a typo or a crash included, so a
test written with it cannot tell the failure it wants from one it does not.
"""

from __future__ import annotations

import ast

import pytest
from helpers import REPO_ROOT, TESTS_ROOT

TOO_BROAD = frozenset({"Exception", "BaseException"})


def broad_raises(tree: ast.AST) -> list[int]:
    """Lines of ``pytest.raises(Exception)`` / ``raises((ValueError, Exception))`` calls."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "raises")
                or (isinstance(node.func, ast.Name) and node.func.id == "raises"))):
            continue
        first = node.args[0]
        names = first.elts if isinstance(first, ast.Tuple) else [first]
        if any(isinstance(n, ast.Name) and n.id in TOO_BROAD for n in names):
            lines.append(node.lineno)
    return lines


def test_no_test_expects_any_exception_at_all() -> None:
    found = [f"{path.relative_to(REPO_ROOT)}:{line}"
             for path in sorted(TESTS_ROOT.rglob("*.py"))
             for line in broad_raises(ast.parse(path.read_text()))]
    assert found == []


@pytest.mark.parametrize(("source", "lines"), [
    ("with pytest.raises(Exception):\n    f()\n", [1]),
    ("with pytest.raises(BaseException, match='x'):\n    f()\n", [1]),
    ("with raises((ValueError, Exception)):\n    f()\n", [1]),
    ("with pytest.raises(ValueError):\n    f()\n", []),
    ("with pytest.raises((KeyError, TypeError)):\n    f()\n", []),
])
def test_the_broad_raises_check_finds_them(source: str, lines: list[int]) -> None:
    assert broad_raises(ast.parse(source)) == lines
