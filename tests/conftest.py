"""Shared fixtures and the tier markers.

Every test is marked with its tier from the folder it lives in (``tests/unit`` -> ``unit``,
``tests/api`` -> ``api``, ...), so ``-m unit`` selects exactly the files under ``tests/unit``.
The fixtures here configure the embedded model and start one real runtime per session.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from helpers import tier_of

from common.config import AppConfig, JudgeRewardConfig, PythonRewardConfig


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its folder; a test outside every tier is an error."""
    for item in items:
        try:
            item.add_marker(tier_of(item.path))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the embedded model is prepared: $SBON_TEST_CACHE, reused across runs if set."""
    configured = os.environ.get("SBON_TEST_CACHE")
    if configured:
        path = Path(configured).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def engine_config(model_cache_dir: Path) -> AppConfig:
    """The embedded model with the judge (default) and a rule-based reward, or the file
    named by $SBON_TEST_CONFIG (scripts/gpu-check.sh: a real policy and reward model; it
    keeps the rewards ``judge`` and ``length`` the tests use)."""
    configured = os.environ.get("SBON_TEST_CONFIG")
    if configured:
        from common.config import load_config

        return load_config(configured, [])
    return AppConfig(
        model={"name": "embedded", "cache_dir": str(model_cache_dir)},
        engine={"max_model_len": 1024, "kv_cache_gib": 1},
        rewards=[
            JudgeRewardConfig(name="judge", type="judge"),
            PythonRewardConfig(name="length", type="python",
                               function="reward.rules:response_length"),
        ],
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def runtime(engine_config: AppConfig) -> AsyncIterator[object]:
    """One real vLLM engine (plus rewards) for every in-process integration test."""
    from engine.runtime import start_runtime

    started = await start_runtime(engine_config)
    try:
        yield started
    finally:
        await started.close()
