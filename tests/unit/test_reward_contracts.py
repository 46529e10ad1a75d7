"""Declared contracts: every reward type has a factory, every scorer declares its health,
timeout and -inf rule, and the guard reads them as declared (a dead engine reads as dead)."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

import pytest
from fakes import FakeBackend, FakeScorer

from common.config import (
    HFRewardConfig,
    LocalModelRewardConfig,
    ModelRewardConfig,
    PRMRewardConfig,
    PythonRewardConfig,
    RewardConfig,
    VLLMRewardConfig,
    load_config,
)
from engine.backend import GenerationBackend
from engine.guarded import RewardFailure, guard
from reward.base import RewardScorer
from reward.registry import FACTORIES, build_scorer
from reward.vllm_reward import Classified, VLLMRewardScorer


def reward_types() -> set[str]:
    members = typing.get_args(typing.get_args(RewardConfig)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0] for m in members}


def test_every_configured_reward_type_has_exactly_one_factory() -> None:
    assert reward_types() == set(FACTORIES)


def test_the_model_rewards_share_one_base() -> None:
    for config in (HFRewardConfig, PRMRewardConfig, VLLMRewardConfig):
        assert issubclass(config, ModelRewardConfig)
        assert {"model", "revision", "dtype", "trust_remote_code"} <= set(config.model_fields)
    assert issubclass(HFRewardConfig, LocalModelRewardConfig)
    assert issubclass(PRMRewardConfig, LocalModelRewardConfig)
    assert not issubclass(VLLMRewardConfig, LocalModelRewardConfig)
    assert not issubclass(PythonRewardConfig, ModelRewardConfig)


def test_a_python_reward_declares_minus_infinity_and_the_guard_honours_it() -> None:
    scorer = build_scorer(PythonRewardConfig(name="v", type="python", timeout_s=7.0,
                                             function="reward.rules:brevity"), None)
    assert isinstance(scorer, RewardScorer)
    guarded = guard(scorer)
    assert guarded.never_choose_negative_infinity and guarded.timeout_s == 7.0
    assert guarded.check([-math.inf, 1.0], 2) == [-math.inf, 1.0]
    strict = guard(FakeScorer())
    with pytest.raises(RewardFailure):
        strict.check([-math.inf, 1.0], 2)


class PoolingStandIn:
    """The ClassifierEngine contract, with a switch that kills it."""

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.num_labels = 1
        self.label2id: dict[str, int] = {}
        self.max_model_len = 64
        self.alive = False

    @property
    def healthy(self) -> bool:
        return self.alive

    async def start(self) -> None:
        self.alive = True

    async def close(self) -> None:
        self.alive = False

    async def reset_prefix_cache(self) -> bool:
        return True

    async def classify(self, token_ids: Sequence[int]) -> Classified:
        return Classified([0.0], len(token_ids), 0)


async def test_a_dead_pooling_engine_makes_the_vllm_reward_dead() -> None:
    engine = PoolingStandIn()
    config = VLLMRewardConfig(name="rm", type="vllm", model="unused")
    guarded = guard(build_scorer(config, None, classifier_engine=lambda c: engine))
    assert isinstance(guarded.inner, VLLMRewardScorer)
    assert not guarded.healthy  # not started
    await engine.start()
    assert guarded.healthy and guarded.status()["state"] == "ok"
    engine.alive = False  # what vLLM reports as ``errored`` once its core process died
    assert not guarded.healthy and guarded.status()["state"] == "dead"


def test_the_fakes_keep_the_declared_contracts() -> None:
    backend: GenerationBackend = FakeBackend()
    assert backend.ready and backend.dead_error is None
    scorer: RewardScorer = FakeScorer()
    assert scorer.healthy and scorer.timeout_s > 0
    assert isinstance(scorer, RewardScorer)


@pytest.mark.parametrize("value", ["-1", "1000001", "2.5", "many"])
def test_a_bad_reward_death_threshold_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="reward_dead_after_failures"):
        load_config(None, [f"server.reward_dead_after_failures={value}"], environ={})


def test_the_reward_death_threshold_loads_and_defaults_to_off() -> None:
    assert load_config(None, [], environ={}).server.reward_dead_after_failures == 0
    config = load_config(None, ["server.reward_dead_after_failures=3"], environ={})
    assert config.server.reward_dead_after_failures == 3
