"""Exported training data is private and durable: 0600 whatever the umask or an older file's
mode, fsynced before the rename; and the ignore files keep logs and exports out of git and
out of container images."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO_ROOT

import bench.export as export_module
from bench.export import write_jsonl, write_parquet

ROWS = [{"prompt": "p", "completion": "c"}]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_exports_are_owner_only_and_fsynced(tmp_path: Path, suffix: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / f"sft{suffix}"
    # An older, world-readable partial file and a permissive umask change nothing.
    out.with_name(out.name + ".partial").write_text("old")
    os.chmod(out.with_name(out.name + ".partial"), 0o666)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(export_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    previous = os.umask(0o000)
    try:
        if suffix == ".jsonl":
            write_jsonl(ROWS, out)
        else:
            write_parquet(ROWS, out, "sft", "text")
    finally:
        os.umask(previous)
    assert mode(out) == 0o600
    assert len(synced) == 2  # the file's data, then the folder's entry for the rename
    assert not out.with_name(out.name + ".partial").exists()
    if suffix == ".parquet":
        assert pq.read_table(out).to_pylist() == ROWS
    else:
        assert out.read_text() == '{"prompt": "p", "completion": "c"}\n'


def test_a_failed_export_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(TypeError):
        write_jsonl([{"x": float("nan")}, {"y": object()}], out)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", [".gitignore", ".dockerignore"])
def test_ignore_files_cover_logs_and_exports(name: str) -> None:
    patterns = (REPO_ROOT / name).read_text().splitlines()
    for needed in ("sbon-datalog", "*.parquet", "*.jsonl.partial", "*.parquet.partial"):
        assert any(p.strip().lstrip("/").rstrip("/") in (needed, f"**/{needed}")
                   for p in patterns), f"{name} does not ignore {needed}"
