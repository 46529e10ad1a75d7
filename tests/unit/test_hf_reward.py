"""The Hugging Face reward backend on a tiny randomly initialised classifier built from a config.

This runs the real loading code (``from_pretrained`` of a folder with a chat template),
batching and label selection; only the weights are random.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tiny_models import build_tiny_reward_model

from common.config import HFRewardConfig
from reward.base import BlockQuery, RewardError
from reward.hf import HFRewardScorer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="module")
def tiny_multilabel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm3"), num_labels=3)


async def started(model: Path, **extra: object) -> HFRewardScorer:
    scorer = HFRewardScorer(HFRewardConfig(name="rm", type="hf", model=str(model), **extra))
    await scorer.start()
    return scorer


PROMPTS = ["write a haiku about the sea"] * 4
RESPONSES = ["the sea is blue", "waves crash on rocks and the sea is calm", "blue", "a haiku"]


async def test_scores_do_not_depend_on_batching(tiny_model: Path) -> None:
    scorer = await started(tiny_model, max_batch_tokens=64)
    try:
        together = await scorer.score(PROMPTS, RESPONSES)
        alone = [(await scorer.score([p], [r]))[0] for p, r in zip(PROMPTS, RESPONSES,
                                                                    strict=True)]
        assert together == pytest.approx(alone, abs=1e-5)
        assert len(set(round(v, 6) for v in together)) > 1  # the model does tell them apart
    finally:
        await scorer.close()


async def test_concurrent_requests_share_batches_and_get_their_own_results(
    tiny_model: Path,
) -> None:
    scorer = await started(tiny_model, batch_wait_ms=20)
    try:
        expected = await scorer.score(PROMPTS, RESPONSES)
        first, second = await asyncio.gather(scorer.score(PROMPTS[:2], RESPONSES[:2]),
                                             scorer.score(PROMPTS[2:], RESPONSES[2:]))
        assert first + second == pytest.approx(expected, abs=1e-5)
    finally:
        await scorer.close()


async def test_chat_template_formats_the_conversation(tiny_model: Path) -> None:
    scorer = await started(tiny_model)
    try:
        text = scorer.format("write a haiku", "the sea")
        assert text.startswith("<|user|> write a haiku <|end|>")
        assert "<|assistant|> the sea" in text
    finally:
        await scorer.close()


async def test_label_choice_on_a_multi_label_head(tiny_multilabel: Path) -> None:
    with pytest.raises(RewardError, match="labels"):
        await started(tiny_multilabel)
    by_name = await started(tiny_multilabel, label="aspect2")
    by_index = await started(tiny_multilabel, label=2)
    try:
        assert await by_name.score(PROMPTS, RESPONSES) == pytest.approx(
            await by_index.score(PROMPTS, RESPONSES))
    finally:
        await by_name.close()
        await by_index.close()


async def test_missing_model_is_a_reward_error(tmp_path: Path) -> None:
    with pytest.raises(RewardError):
        await started(tmp_path / "absent")


async def test_shared_prompt_kv_gives_the_full_computation_values(tiny_model: Path) -> None:
    shared = await started(tiny_model, max_batch_tokens=64)
    full = await started(tiny_model, max_batch_tokens=64, share_prompt_kv=False)
    try:
        assert shared.shares_prompt_kv and not full.shares_prompt_kv
        prompts = PROMPTS + ["please write about the rocks"] * 2
        responses = [*RESPONSES, "the rocks", "calm rocks and blue waves crash"]
        assert await shared.score(prompts, responses) == pytest.approx(
            await full.score(prompts, responses), abs=1e-4)
    finally:
        await shared.close()
        await full.close()


def block_of(prompt: str, responses: list[str]) -> BlockQuery:
    return BlockQuery(prompt=prompt, prompt_ids=[], prefix_text="", prefix_ids=[],
                      block_texts=responses, block_ids=[() for _ in responses])


async def test_a_block_reports_the_tokens_the_model_ran_on(tiny_model: Path) -> None:
    shared = await started(tiny_model)
    full = await started(tiny_model, share_prompt_kv=False)
    try:
        whole = sum(len(full._encode(full.format(PROMPTS[0], r))) for r in RESPONSES)
        prompt = len(full._encode(full.format_prefix(PROMPTS[0])))
        alone = await full.score_block(block_of(PROMPTS[0], RESPONSES))
        assert (alone.computed_tokens, alone.cached_tokens) == (whole, 0)
        # Sharing the prompt's KV runs it once instead of once per response.
        together = await shared.score_block(block_of(PROMPTS[0], RESPONSES))
        assert together.cached_tokens == prompt * (len(RESPONSES) - 1) > 0
        assert together.computed_tokens == whole - together.cached_tokens
        assert together.rewards == pytest.approx(alone.rewards, abs=1e-4)
    finally:
        await shared.close()
        await full.close()
