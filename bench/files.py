"""Result files that survive interruption: atomic writes, and the eval's per-prompt checkpoint.

Every result file is written to a temporary file in the same folder and renamed over the
target, so a reader (or a crash) sees the old file or the new one, never half of one.
``sbon eval`` appends each prompt's finished work (its pool of base samples, each blockwise
run) to ``eval.checkpoint.jsonl`` as it completes; run again with the same settings and
prompts, it resumes from there and draws the same results. The checkpoint is removed once
the results are written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "eval.checkpoint.jsonl"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; renamed over ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                    suffix=path.suffix or ".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return path


def _json(value: Any) -> Any:
    """Dataclasses and tuples as JSON values (floats keep every bit through repr)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def run_key(settings: Any, prompts: Sequence[Any]) -> str:
    """Identifies an eval run: its settings and its prompts."""
    text = json.dumps({"settings": _json(settings), "prompts": [_json(p) for p in prompts]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class EvalCheckpoint:
    """The finished work of an eval run, one JSON line per finished piece.

    ``kind`` is "pool" (a prompt's base samples) or "block<B>" (a prompt's blockwise run);
    ``index`` is the prompt's index; ``data`` is the piece as JSON.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.done: dict[tuple[str, int], Any] = {}
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            lines = []
        header = _parse(lines[0]) if lines else None
        if not header or header.get("key") != self.key:
            self._start()  # another run's checkpoint, or none: start afresh
            return
        for line in lines[1:]:
            record = _parse(line)
            if record is not None:  # a line cut short by the interruption is dropped
                self.done[(record["kind"], int(record["index"]))] = record["data"]

    def _start(self) -> None:
        write_atomic(self.path, json.dumps({"key": self.key}) + "\n")

    @property
    def resumed(self) -> int:
        return len(self.done)

    def get(self, kind: str, index: int) -> Any:
        return self.done.get((kind, index))

    def record(self, kind: str, index: int, data: Any) -> None:
        """Append one finished piece and make it durable before going on."""
        value = _json(data)
        self.done[(kind, index)] = value
        with self.path.open("a") as handle:
            handle.write(json.dumps({"kind": kind, "index": index, "data": value}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
