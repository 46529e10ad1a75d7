#!/usr/bin/env bash
# Run the whole test suite: lint, unit, API, real-engine integration and end-to-end tiers.
#   scripts/test.sh              # everything
#   scripts/test.sh -m unit      # one tier (markers: unit, api, integration, e2e, lint)
#   scripts/test.sh -m docker    # the container tier: needs a Docker daemon, not in the default run
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Tests prepare the embedded model into a cache of their own unless one is given.
export SBON_TEST_CACHE="${SBON_TEST_CACHE:-$HOME/.cache/sbon-test}"
exec .venv/bin/python -m pytest "$@"
