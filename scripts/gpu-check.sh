#!/usr/bin/env bash
# Check SoftBoN Serve on a machine with an NVIDIA GPU, in one command:
#   scripts/gpu-check.sh [--policy HF_ID] [--reward HF_ID] [--n 8] [--port 8321] [--out DIR]
# It installs the GPU extra into .venv-gpu, writes a server configuration with a real policy
# (Qwen/Qwen2.5-0.5B-Instruct) and a real reward model (Skywork/Skywork-Reward-V2-Qwen3-0.6B)
# in vLLM, runs the integration tier on that configuration and the end-to-end tier, starts
# the server, runs `sbon bench` at n = 8 against it, and prints one summary (what passed,
# ratios to plain n-sampling, GPU memory per engine). Exit 0 only if everything passed.
# Gated models need HF_TOKEN in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

POLICY="${SBON_GPU_POLICY:-}"
REWARD="${SBON_GPU_REWARD:-}"
N=8
PORT=8321
OUT="gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --policy) POLICY="$2"; shift 2 ;;
    --reward) REWARD="$2"; shift 2 ;;
    --n) N="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
  esac
done

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi fails); this check needs one" >&2
  exit 2
fi

PYTHON="${PYTHON:-python3}"
VENV=".venv-gpu"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
echo "[gpu-check] installing the GPU extra (vLLM with CUDA) into $VENV"
"$VENV/bin/python" -m pip install -q -e ".[gpu,dev,ray]"

SETTINGS=$("$VENV/bin/python" - "$POLICY" "$REWARD" "$N" "$PORT" "$OUT" <<'PY'
import json, sys
policy, reward, n, port, out = sys.argv[1:]
settings = {"n": int(n), "port": int(port), "out": out}
if policy:
    settings["policy"] = policy
if reward:
    settings["reward"] = reward
print(json.dumps(settings))
PY
)
export PYTHONUNBUFFERED=1 SBON_TEST_CACHE="${SBON_TEST_CACHE:-$HOME/.cache/sbon-test}"
exec "$VENV/bin/python" -m bench.gpucheck_run run --settings "$SETTINGS" --python "$VENV/bin/python"
