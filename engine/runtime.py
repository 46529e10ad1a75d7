"""Start and stop everything a process needs to serve soft best-of-n: engine, rewards, loop."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from common.config import AppConfig
from engine.sbon import SBoNEngine
from engine.selftest import StartupError, check_compiler, describe, run_selftest
from engine.vllm_backend import VLLMBackend, engine_environment, on_cpu
from engine.vllm_pooling import PoolingEngine
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
    """Start the vLLM engine, load every configured reward, then run the self-test.

    The self-test (:mod:`engine.selftest`) generates two tokens with log-probabilities and
    scores once per reward, so a broken environment fails here, at start, not at the first
    request; everything started is closed again before the error propagates.
    """
    if on_cpu():
        environ = {**os.environ, **engine_environment(config, True, os.environ)}
        check_compiler(environ.get("TORCHDYNAMO_DISABLE") != "1", environ)
    backend = VLLMBackend(config)
    await backend.start()
    # Reward engines start after the generator, one after the other (their memory shares
    # are fixed in the configuration).
    scorers = build_scorers(config.rewards, judge_source=backend, classifier_engine=PoolingEngine)
    try:
        for name, scorer in scorers.items():
            try:
                await scorer.start()
            except Exception as exc:
                raise StartupError(f"the reward '{name}' failed to start: {describe(exc)}"
                                   ) from exc
    except BaseException:
        await backend.close()
        raise
    assert config.default_reward is not None
    runtime = Runtime(config, backend, scorers,
                      SBoNEngine(backend, scorers, config.default_reward))
    try:
        await run_selftest(backend, scorers,
                           skip=[r.name for r in config.rewards if not r.selftest])
    except BaseException:
        await runtime.close()
        raise
    return runtime
