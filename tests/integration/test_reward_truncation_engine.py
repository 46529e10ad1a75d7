"""A long prompt on the real pooling engine: the ``vllm`` reward backend cuts the oldest
prompt tokens, never a response, agrees with the ``hf`` backend on the cut inputs, and still
tells the candidates apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_reward_model

from common.config import HFRewardConfig, VLLMRewardConfig
from engine.vllm_pooling import PoolingEngine
from reward.base import BlockQuery
from reward.hf import HFRewardScorer
from reward.vllm_reward import VLLMRewardScorer

LONG_PROMPT = "write a haiku about the sea " + "the sea is blue and calm " * 60
RESPONSES = ["waves crash on rocks", "calm", "the sea is blue", "a haiku about the waves"]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm-long") / "rm", hidden_size=64,
                                   heads=1)


async def test_a_long_prompt_keeps_every_response_whole(reward_folder: Path) -> None:
    config = VLLMRewardConfig(name="rm", type="vllm", model=str(reward_folder),
                              max_model_len=64)
    served = VLLMRewardScorer(config, PoolingEngine(config))
    hf = HFRewardScorer(HFRewardConfig(name="hf", type="hf", model=str(reward_folder),
                                       max_length=64))
    await served.start()
    await hf.start()
    try:
        query = BlockQuery(prompt=LONG_PROMPT, prompt_ids=(), prefix_text="", prefix_ids=(),
                           block_texts=RESPONSES, block_ids=[()] * len(RESPONSES))
        scores = await served.score_block(query)
        reference = await hf.score_block(query)
        assert scores.truncated and reference.truncated
        assert scores.rewards == pytest.approx(reference.rewards, abs=1e-3)
        assert len({round(r, 4) for r in scores.rewards}) == len(RESPONSES)
        room = served.response_room()
        assert room is not None and room == hf.response_room()
    finally:
        await served.close()
        await hf.close()
