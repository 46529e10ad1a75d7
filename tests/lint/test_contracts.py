"""Capabilities are declared, not guessed: no ``getattr``/``hasattr`` on the project's own
types in server/, engine/ and reward/ (a renamed attribute would read as the default).

What the protocols declare (reward/base.py, engine/backend.py) is read directly. The
allow-list names every third-party object still read by name, with why; an entry that no
longer matches anything fails too, so the list cannot grow stale.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO_ROOT

SCANNED = ("server", "engine", "reward")
DYNAMIC = "*"  # the attribute name is computed

# (module, the object read, attribute): why it is read by name.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("server/errors.py", "exc", "headers"): "Starlette's HTTPException",
    ("server/lifecycle.py", "self", "_captured_signals"): "uvicorn.Server's private state",
    ("server/replicas.py", "self.app", DYNAMIC): "forwards Ray Serve's reads to the app",
    ("engine/model_prep.py", "config", "quantization_config"): "a transformers config",
    ("engine/model_prep.py", "config", "tie_word_embeddings"): "a transformers config",
    ("engine/model_prep.py", "model", "generation_config"): "a transformers model",
    ("engine/parallel.py", "os", "sched_getaffinity"): "Linux-only in the standard library",
    ("engine/vllm_backend.py", "tokenizer", "chat_template"): "a Hugging Face tokenizer",
    ("engine/vllm_pooling.py", "hf_config", "num_labels"): "a transformers config",
    ("engine/vllm_pooling.py", "hf_config", "label2id"): "a transformers config",
    ("reward/hf.py", "torch", DYNAMIC): "a torch dtype by its configured name",
    ("reward/hf.py", "model_config", "num_labels"): "a transformers config",
    ("reward/hf.py", "self._tokenizer", "chat_template"): "a Hugging Face tokenizer",
    ("reward/prm.py", "torch", DYNAMIC): "a torch dtype by its configured name",
    ("reward/prm.py", "tokenizer", "is_fast"): "a Hugging Face tokenizer",
    ("reward/prm.py", "tokenizer", "chat_template"): "a Hugging Face tokenizer",
    ("reward/prm.py", "self._tokenizer", "chat_template"): "a Hugging Face tokenizer",
    ("reward/prm.py", "model_config", "auto_map"): "a transformers config",
    ("reward/prm.py", "output", "logits"): "a transformers model output or a tuple",
    ("reward/callables.py", "target", DYNAMIC): "the user's module, by the configured path",
    ("reward/vllm_reward.py", "tokenizer", "chat_template"): "a Hugging Face tokenizer",
}


def attribute_reads(root: Path = REPO_ROOT) -> Iterator[tuple[str, int, tuple[str, str, str]]]:
    """(module, line, (module, object, attribute)) of every getattr/hasattr call."""
    for package in SCANNED:
        for path in sorted((root / package).rglob("*.py")):
            module = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
                    name = node.args[1]
                    attribute = (name.value if isinstance(name, ast.Constant)
                                 and isinstance(name.value, str) else DYNAMIC)
                    yield module, node.lineno, (module, ast.unparse(node.args[0]), attribute)


def test_own_types_are_not_read_by_attribute_name() -> None:
    unexpected = [f"{module}:{line}: getattr/hasattr({key[1]}, {key[2]!r})"
                  for module, line, key in attribute_reads() if key not in ALLOWED]
    assert not unexpected, ("declare the capability in the type's protocol and read it "
                            "directly, or allow-list a third-party object:\n"
                            + "\n".join(unexpected))


def test_every_allowed_read_still_exists() -> None:
    found = {key for _, _, key in attribute_reads()}
    stale = sorted(f"{key}" for key in ALLOWED if key not in found)
    assert not stale, f"allow-list entries that match nothing any more: {stale}"


def test_the_scan_sees_reads_by_name(tmp_path: Path) -> None:
    # The scanner itself must find what it is meant to refuse.
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "x.py").write_text(
        "def f(scorer, name):\n    return getattr(scorer, 'healthy', True) and "
        "hasattr(scorer.inner, name)\n", encoding="utf-8")
    keys = sorted(key for _, _, key in attribute_reads(tmp_path))
    assert keys == [("engine/x.py", "scorer", "healthy"), ("engine/x.py", "scorer.inner", "*")]


def test_the_installed_uvicorn_is_in_the_pinned_tested_range() -> None:
    # The drain depends on how uvicorn reports its shutdown to requests in flight.
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [Requirement(d) for d in project["project"]["dependencies"]]
    (uvicorn,) = [p for p in pins if p.name == "uvicorn"]
    assert uvicorn.specifier and "<" in str(uvicorn.specifier), "pin an upper bound"
    assert version("uvicorn") in uvicorn.specifier


def test_the_core_packages_are_type_checked_strictly() -> None:
    # mypy runs in test_lint.py with these settings; they must not quietly fall away.
    import tomllib

    mypy = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    (core,) = [o for o in mypy["overrides"] if "server.*" in o["module"]]
    assert set(core["module"]) >= {"common.*", "reward.*", "engine.*", "server.*"}
    strict_flags = {"disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls",
                    "disallow_untyped_defs", "disallow_incomplete_defs",
                    "disallow_untyped_decorators", "warn_return_any", "no_implicit_reexport",
                    "strict_equality", "extra_checks"}
    assert all(core.get(flag) is True for flag in strict_flags), core
    assert mypy["warn_unused_ignores"] and mypy["check_untyped_defs"]
