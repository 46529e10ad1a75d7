"""What model rewards compute on the real engine: the judge's queries reuse the prompt and
earlier blocks from the prefix cache, and the ``vllm`` reward backend (a second, pooling
engine) scores like the ``hf`` backend and reuses the shared prefix too."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_reward_model

from common.config import HFRewardConfig, VLLMRewardConfig
from common.prompts import Message
from engine.sbon import SBoNEngine
from engine.types import SamplingSettings, SBoNParams
from engine.vllm_backend import CPU_KV_BLOCK_SIZE
from engine.vllm_pooling import PoolingEngine
from reward.base import RewardError
from reward.hf import HFRewardScorer
from reward.vllm_reward import VLLMRewardScorer
from server.errors import to_api_error

PROMPT = (Message("system", "You are a helpful assistant who answers in full sentences "
                  "and explains every step of the reasoning with care."),
          Message("user", "Write a haiku about the sea, then explain its imagery."),)


def _full_blocks(tokens: int) -> int:
    return tokens // CPU_KV_BLOCK_SIZE * CPU_KV_BLOCK_SIZE


async def test_judge_queries_reuse_the_prompt_from_the_cache(runtime) -> None:
    n = 4
    result = await runtime.sbon.run(PROMPT, SBoNParams(n=n, lam=1.0),
                                    SamplingSettings(max_tokens=40, seed=3), "it-cache-judge")
    prompt_tokens = result.prompt_tokens
    assert prompt_tokens >= CPU_KV_BLOCK_SIZE
    scoring = result.prefill_scoring
    # Every query finds at least the prompt's whole KV blocks in the cache: the shared
    # part was computed once (by generation), not once per query.
    assert scoring.cached >= n * _full_blocks(prompt_tokens)
    # Each query is prompt + response + follow-up question, and what it computes is its own
    # tail (the response's last partial KV block and the question), far less than that.
    prompt_ids = runtime.backend.encode_prompt(PROMPT)
    judge = runtime.scorers["judge"]
    queries = [judge.query_ids(prompt_ids, c.token_ids) for c in result.final_block.candidates]
    assert scoring.total == sum(len(q) for q in queries)
    suffix = len(queries[0]) - len(prompt_ids) - len(result.final_block.candidates[0].token_ids)
    assert scoring.computed <= n * (CPU_KV_BLOCK_SIZE + suffix)
    # The n samples of generation share the prompt's blocks too.
    assert result.prefill_generation.cached >= (n - 1) * _full_blocks(prompt_tokens)


async def test_a_second_block_reads_the_first_from_the_cache(runtime) -> None:
    n, size = 3, CPU_KV_BLOCK_SIZE
    result = await runtime.sbon.run(PROMPT, SBoNParams(n=n, lam=1.0, block_size=size),
                                    SamplingSettings(max_tokens=2 * size, seed=11), "it-cache-b")
    if len(result.blocks) < 2:
        pytest.skip("the sample ended within one block")
    first, second = result.blocks[0], result.blocks[1]
    assert len(first.chosen.token_ids) == size
    shared = _full_blocks(result.prompt_tokens + size)
    # Generation of block 2 and its judge queries both start from prompt + block 1.
    assert second.prefill_generation.cached >= n * shared - CPU_KV_BLOCK_SIZE
    assert second.prefill_scoring.cached >= n * shared
    assert second.prefill_scoring.computed < n * (2 * size + 64)


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", hidden_size=64,
                                   heads=1)


async def test_the_vllm_reward_backend_scores_like_hf_and_reuses_the_prefix(
        runtime, reward_folder: Path) -> None:
    hf = HFRewardScorer(HFRewardConfig(name="hf", type="hf", model=str(reward_folder),
                                       max_length=256))
    served = VLLMRewardScorer(
        VLLMRewardConfig(name="rm", type="vllm", model=str(reward_folder), max_model_len=256),
        PoolingEngine(VLLMRewardConfig(name="rm", type="vllm", model=str(reward_folder),
                                       max_model_len=256)))
    await hf.start()
    await served.start()
    try:
        engine = SBoNEngine(runtime.backend, {"rm": served}, "rm")
        result = await engine.run(PROMPT, SBoNParams(n=4, lam=0.0),
                                  SamplingSettings(max_tokens=24, seed=5), "it-vllm-rm")
        block = result.blocks[0]
        texts = [c.text for c in block.candidates]
        expected = await hf.score([PROMPT] * 4, texts)
        assert block.rewards == pytest.approx(expected, abs=1e-3)
        assert block.rewards[block.chosen_index] == max(block.rewards)
        # The first query computes the shared prefix; the three others reuse it.
        assert result.prefill_scoring.cached >= 3 * CPU_KV_BLOCK_SIZE
        # Several labels: a chosen one is read raw.
        text_scores = await served.score(["the sea is blue"] * 2, ["waves crash", "calm"])
        assert text_scores == pytest.approx(
            await hf.score(["the sea is blue"] * 2, ["waves crash", "calm"]), abs=1e-3)
    finally:
        await served.close()
        await hf.close()
    # A failure in the pooling engine is a reward error, which the server answers with 503.
    with pytest.raises(RewardError) as failure:
        await served.score(["the sea"], ["calm"])
    assert to_api_error(failure.value).status == 503
