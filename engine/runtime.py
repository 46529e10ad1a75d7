"""Start and stop everything a process needs to serve soft best-of-n: engine, rewards, loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.config import AppConfig
from engine.sbon import SBoNEngine
from engine.vllm_backend import VLLMBackend
from reward.base import RewardScorer
from reward.registry import build_scorers

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The started engine, its reward scorers and the soft best-of-n loop over them."""

    config: AppConfig
    backend: VLLMBackend
    scorers: dict[str, RewardScorer]
    sbon: SBoNEngine

    async def close(self) -> None:
        for scorer in self.scorers.values():
            try:
                await scorer.close()
            except Exception:  # closing must go on for the others
                logger.exception("closing a reward scorer failed")
        await self.backend.close()


async def start_runtime(config: AppConfig) -> Runtime:
    """Start the vLLM engine, then load every configured reward."""
    backend = VLLMBackend(config)
    await backend.start()
    scorers = build_scorers(config.rewards, judge_source=backend)
    try:
        for scorer in scorers.values():
            await scorer.start()
    except BaseException:
        await backend.close()
        raise
    assert config.default_reward is not None
    return Runtime(config, backend, scorers, SBoNEngine(backend, scorers, config.default_reward))
