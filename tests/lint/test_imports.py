"""The packages import one another only in the allowed directions, read with ``ast``.

common -> nothing; reward -> common; engine -> reward, common; server -> engine, reward,
common; bench -> server, engine, reward, common; cli -> anything. So nothing imports bench
but bench and cli, and nothing imports cli but cli. Every import counts: at the top of a
module, inside a function or under ``TYPE_CHECKING``, absolute or relative, and
``importlib.import_module`` of a literal name. Some third-party libraries are kept out of
layers that must not depend on them (plots, progress bars and HTTP clients out of the
decoding engine; the web framework out of the engine and the rewards; vLLM and torch out
of the HTTP layer).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import PACKAGES, REPO_ROOT

ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "reward": frozenset({"common"}),
    "engine": frozenset({"reward", "common"}),
    "server": frozenset({"engine", "reward", "common"}),
    "bench": frozenset({"server", "engine", "reward", "common"}),
    "cli": frozenset(PACKAGES),
}

FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "engine": frozenset({"matplotlib", "tqdm", "httpx", "fastapi", "starlette"}),
    "reward": frozenset({"fastapi", "starlette"}),
    "server": frozenset({"vllm", "torch"}),
}

IMPORT_FUNCTIONS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class Import:
    """One imported module, fully resolved, and the line that imports it."""

    module: str
    line: int

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    """The dotted name of a source file: ``engine/sbon.py`` -> ``engine.sbon``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_relative(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute module of ``from <dots><module> import ...`` written in ``importer``.

    A relative import that climbs above the importer's top-level package (which Python
    refuses at run time) resolves to ``""`` and is reported as a violation.
    """
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > len(package):
        return ""
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(tree: ast.AST, importer: str, is_package: bool = False) -> Iterator[Import]:
    """Every module a parsed source file imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(node.module, node.level, importer, is_package)
            yield Import(base, node.lineno)
            if base and node.module is None:  # ``from . import x``: x is a module of the package
                for alias in node.names:
                    yield Import(f"{base}.{alias.name}", node.lineno)
        elif (isinstance(node, ast.Call) and _called_name(node.func) in IMPORT_FUNCTIONS
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield Import(node.args[0].value, node.lineno)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def violations(tree: ast.AST, importer: str, is_package: bool = False,
               where: str = "<source>") -> list[str]:
    """What a parsed file imports against the rules of its package (empty when all is well)."""
    package = importer.split(".")[0]
    allowed = ALLOWED[package] | {package}
    forbidden = FORBIDDEN_THIRD_PARTY.get(package, frozenset())
    found = []
    for item in imports_of(tree, importer, is_package):
        if not item.module:
            found.append(f"{where}:{item.line}: a relative import above the package {package}")
        elif item.top in PACKAGES and item.top not in allowed:
            found.append(f"{where}:{item.line}: {package} imports {item.module} "
                         f"({package} may import only {sorted(ALLOWED[package]) or 'nothing'})")
        elif item.top in forbidden:
            found.append(f"{where}:{item.line}: {package} imports {item.module}, "
                         f"which {package} must never import")
    return found


def check_source(source: str, importer: str, is_package: bool = False) -> list[str]:
    return violations(ast.parse(source), importer, is_package)


def package_files(package: str) -> list[Path]:
    return sorted(p for p in (REPO_ROOT / package).rglob("*.py") if ".venv" not in p.parts)


# --- the project's own packages -------------------------------------------------------------


def test_the_rules_cover_exactly_the_project_packages() -> None:
    assert set(ALLOWED) == set(PACKAGES)
    assert all(allowed <= set(PACKAGES) for allowed in ALLOWED.values())
    assert all((REPO_ROOT / package / "__init__.py").is_file() for package in PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_allowed_directions(package: str) -> None:
    files = package_files(package)
    assert files, f"no source files found under {package}/"
    problems: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        problems += violations(tree, module_name(path), path.name == "__init__.py",
                               str(path.relative_to(REPO_ROOT)))
    assert not problems, "\n".join(problems)


def test_the_walk_sees_imports_inside_functions_of_the_real_code() -> None:
    # cli/main.py imports its subcommands' packages lazily, inside functions: the checker must
    # see them, or it would pass over exactly the imports most likely to go astray.
    tree = ast.parse((REPO_ROOT / "cli" / "main.py").read_text())
    top_level = {node.lineno for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)}
    nested = [i for i in imports_of(tree, "cli.main") if i.line not in top_level]
    assert {i.top for i in nested} >= {"common", "engine"}


# --- the checker itself, on synthetic sources -----------------------------------------------


@pytest.mark.parametrize(("importer", "source"), [
    ("engine.sbon", "from server.app import create_app\n"),
    ("engine.sbon", "def f():\n    import server.protocol\n"),
    ("engine.sbon", "import typing\nif typing.TYPE_CHECKING:\n    import bench.bench\n"),
    ("engine.sbon", "from ..server import app\n"),  # climbs out of engine
    ("engine.sub.mod", "from ...server import app\n"),
    ("engine.sbon", "import importlib\nimportlib.import_module('server.app')\n"),
    ("common.config", "from reward.base import RewardScorer\n"),
    ("common.config", "from engine import types\n"),
    ("reward.judge", "from engine.types import Candidate\n"),
    ("server.app", "from bench.http import post\n"),
    ("server.app", "class A:\n    def m(self):\n        from cli.report import render_text\n"),
    ("bench.bench", "from cli.main import main\n"),
    ("bench", "from ..cli import main\n"),
    ("bench", "from .. import cli\n"),
])
def test_a_wrong_direction_is_reported(importer: str, source: str) -> None:
    assert len(check_source(source, importer, is_package="." not in importer)) == 1


@pytest.mark.parametrize(("importer", "source"), [
    ("engine.sbon", "import matplotlib.pyplot as plt\n"),
    ("engine.sbon", "def f():\n    from tqdm import tqdm\n"),
    ("engine.vllm_backend", "import httpx\n"),
    ("engine.sbon", "from fastapi import FastAPI\n"),
    ("reward.hf", "from starlette.responses import Response\n"),
    ("server.app", "import torch\n"),
    ("server.serving", "def f():\n    from vllm import SamplingParams\n"),
])
def test_a_forbidden_third_party_import_is_reported(importer: str, source: str) -> None:
    assert len(check_source(source, importer)) == 1


@pytest.mark.parametrize(("importer", "source"), [
    ("engine.sbon", "from common.config import Normalization\nfrom reward.base import X\n"),
    ("engine.sbon", "from .selection import select\nfrom . import types\n"),
    ("server.app", "from engine.resolve import resolve_params\nimport fastapi\n"),
    ("bench.bench", "from server.protocol import Usage\nimport matplotlib\nimport httpx\n"),
    ("cli.main", "from bench.cli import add_measure_commands\nfrom server.app import run_server\n"),
    ("reward.hf", "import torch\nfrom common.prompts import Prompt\n"),
    ("common.values", "import math\nimport importlib\nimportlib.import_module(name)\n"),
])
def test_allowed_imports_pass(importer: str, source: str) -> None:
    assert check_source(source, importer) == []


def test_relative_imports_resolve_against_the_importing_module() -> None:
    def resolved(source: str, importer: str, is_package: bool = False) -> list[str]:
        return [i.module for i in imports_of(ast.parse(source), importer, is_package)]

    assert resolved("from .selection import select\n", "engine.sbon") == ["engine.selection"]
    assert resolved("from . import types\n", "engine.sbon") == ["engine", "engine.types"]
    assert resolved("from .sbon import X\n", "engine", is_package=True) == ["engine.sbon"]
    assert resolved("from ..sbon import X\n", "engine.sub.mod") == ["engine.sbon"]
    assert resolved("from .. import sbon\n", "engine.sub", is_package=True) == [
        "engine", "engine.sbon"]
    assert resolved("from ..server import app\n", "engine.sbon") == [""]  # above engine
    assert resolved("from ..x import y\n", "engine", is_package=True) == [""]


def test_module_names_of_files() -> None:
    assert module_name(REPO_ROOT / "engine" / "sbon.py") == "engine.sbon"
    assert module_name(REPO_ROOT / "engine" / "__init__.py") == "engine"
