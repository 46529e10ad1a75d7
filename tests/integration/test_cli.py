"""``sbon generate`` as a user runs it: a separate process, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT


def test_generate_json_blockwise(model_cache_dir: Path) -> None:
    env = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "cli.main", "generate", "Write a haiku about the sea.",
               "--n", "3", "--lam", "0.5", "--block-size", "8", "--max-tokens", "16",
               "--seed", "7", "--json", "--config", str(REPO_ROOT / "config.yaml")]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result) >= {"text", "chosen_index", "candidates", "blocks", "diagnostics"}
    assert len(result["candidates"]) == 3
    assert {"text", "reward", "weight"} <= set(result["candidates"][0])
    assert 1 <= len(result["blocks"]) <= 2
    for block in result["blocks"]:
        assert len(block["candidates"]) == 3 and 0 <= block["chosen_index"] < 3
    assert set(result["diagnostics"]) >= {"ess", "kl_from_uniform", "kl_bon_bound",
                                          "kl_estimate", "win_rate_bound"}
    assert result["text"] == "".join(b["candidates"][b["chosen_index"]]["text"]
                                     for b in result["blocks"])


def test_generate_reports_a_bad_reward_name_cleanly() -> None:
    done = subprocess.run([sys.executable, "-m", "cli.main", "generate", "hi", "--set",
                           "default_reward=nope"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "default_reward" in done.stderr and "Traceback" not in done.stderr


def test_generate_per_response_with_a_seed_is_reproducible(model_cache_dir: Path) -> None:
    env = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "cli.main", "generate", "Write a haiku about the sea.",
               "--n", "4", "--lam", "0.5", "--max-tokens", "12", "--seed", "3", "--json",
               "--config", str(REPO_ROOT / "config.yaml")]
    outputs = []
    for _ in range(2):
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(json.loads(done.stdout))
    first, second = outputs
    assert len(first["blocks"]) == 1 and len(first["candidates"]) == 4
    assert first["text"] == first["candidates"][first["chosen_index"]]["text"]
    assert first["text"] == second["text"] and first["chosen_index"] == second["chosen_index"]
    assert [c["reward"] for c in first["candidates"]] == pytest.approx(
        [c["reward"] for c in second["candidates"]], abs=1e-4)
