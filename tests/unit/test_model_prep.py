"""Preparation of the embedded model: once under a lock, verified by its marker, redone
when interrupted or damaged. The conversion itself is replaced by a small stand-in."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from engine import model_prep
from engine.model_prep import FOLDER_NAME, MARKER, is_prepared, prepare_embedded_model


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF conversion by one that writes small files slowly; count the calls."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for the other threads to arrive meanwhile
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "tokenizer.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 4096)

    monkeypatch.setattr(model_prep, "_convert", convert)
    monkeypatch.setattr(model_prep, "find_gguf", lambda: Path("unused.gguf"))
    return calls


def test_processes_starting_together_prepare_once(tmp_path: Path, conversions: list[Path]
                                                   ) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_embedded_model(tmp_path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = tmp_path / FOLDER_NAME
    assert results == [folder] * 4 and len(conversions) == 1
    assert is_prepared(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER_NAME, FOLDER_NAME + ".lock"]
    assert prepare_embedded_model(tmp_path) == folder and len(conversions) == 1


def test_a_damaged_preparation_is_redone(tmp_path: Path, conversions: list[Path]) -> None:
    folder = prepare_embedded_model(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\1" * 4096)  # same size, other bytes
    assert not is_prepared(folder) and is_prepared(folder, verify_hashes=False)
    prepare_embedded_model(tmp_path)
    assert len(conversions) == 2 and weights.read_bytes() == b"\0" * 4096
    (folder / "tokenizer.json").unlink()
    prepare_embedded_model(tmp_path)
    assert len(conversions) == 3 and is_prepared(folder)


def test_an_interrupted_preparation_is_redone_and_its_leftovers_removed(
        tmp_path: Path, conversions: list[Path]) -> None:
    folder = tmp_path / FOLDER_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no marker: an interrupted earlier layout
    leftover = tmp_path / (FOLDER_NAME + ".partial-dead")
    leftover.mkdir()
    prepare_embedded_model(tmp_path)
    assert is_prepared(folder) and not leftover.exists()
    assert (folder / MARKER).is_file()


def test_a_failed_conversion_leaves_no_staging_folder(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(model_prep, "_convert", broken)
    monkeypatch.setattr(model_prep, "find_gguf", lambda: Path("unused.gguf"))
    with pytest.raises(RuntimeError):
        prepare_embedded_model(tmp_path)
    assert not (tmp_path / FOLDER_NAME).exists()
    assert not list(tmp_path.glob("*.partial-*"))
