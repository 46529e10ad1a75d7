"""Model rewards keep the response whole: a long prompt loses its oldest tokens, the same
number for every candidate, and the rewards still tell the candidates apart (real tiny
Hugging Face models; the ``vllm`` backend's input building over its real tokenizer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tiny_models import build_tiny_reward_model

from common.config import HFRewardConfig, VLLMRewardConfig
from reward.base import BlockQuery
from reward.hf import HFRewardScorer
from reward.truncation import ResponseTooLong, check_response_room, fit_group
from reward.vllm_reward import Classified, VLLMRewardScorer

LONG_PROMPT = "write a haiku about the sea " + "the sea is blue and calm " * 40
RESPONSES = ["waves crash on rocks", "calm", "the sea is blue", "a haiku about the waves"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm-trunc"))


def query(prompt: str, responses: Sequence[str]) -> BlockQuery:
    return BlockQuery(prompt=prompt, prompt_ids=(), prefix_text="", prefix_ids=(),
                      block_texts=list(responses), block_ids=[()] * len(responses))


def test_fit_group_cuts_the_same_oldest_tokens_from_every_input() -> None:
    inputs = [[0, 1, 2, 3, 4, 5, 6, 70, 71], [0, 1, 2, 3, 4, 5, 6, 80]]
    fitted, cut = fit_group(inputs, limit=6, keep_head=1)
    assert cut and fitted == [[0, 4, 5, 6, 70, 71], [0, 4, 5, 6, 80]]
    assert fit_group(inputs, limit=9) == (inputs, False)
    assert fit_group(inputs, limit=6)[0] == [[3, 4, 5, 6, 70, 71], [3, 4, 5, 6, 80]]


def test_the_response_room_check_names_the_reward_and_max_tokens() -> None:
    class Limited:
        name = "rm"

        def response_room(self) -> int | None:
            return 100

    check_response_room(Limited(), 100)
    check_response_room(object(), 10**6)  # a reward with no length limit
    with pytest.raises(ResponseTooLong, match=r"max_tokens = 101 .*reward 'rm'.*100 tokens"):
        check_response_room(Limited(), 101)


async def started(model: Path, **extra: Any) -> HFRewardScorer:
    scorer = HFRewardScorer(HFRewardConfig(name="rm", type="hf", model=str(model), **extra))
    await scorer.start()
    return scorer


@pytest.mark.parametrize("share_prompt_kv", [True, False])
async def test_a_long_prompt_leaves_every_response_whole(tiny_model: Path,
                                                         share_prompt_kv: bool) -> None:
    scorer = await started(tiny_model, max_length=32, share_prompt_kv=share_prompt_kv)
    try:
        assert scorer.shares_prompt_kv is share_prompt_kv
        scores = await scorer.score_block(query(LONG_PROMPT, RESPONSES))
        assert scores.truncated
        # Cut at the front, every candidate is still read (at the front, all four would be
        # the same prompt tokens and get one reward: a uniform, blind selection).
        assert len({round(r, 5) for r in scores.rewards}) == len(RESPONSES)
        # The values are those of the inputs cut by hand: the same oldest prompt tokens
        # dropped from all, so the longest fills max_length exactly.
        full = [scorer._encode(scorer.format(LONG_PROMPT, r)) for r in RESPONSES]
        cut = max(map(len, full)) - 32
        expected = scorer._score_full([ids[cut:] for ids in full])
        assert scores.rewards == pytest.approx(expected, abs=1e-4)
        short = await scorer.score_block(query("write a haiku", RESPONSES))
        assert not short.truncated
    finally:
        await scorer.close()


async def test_the_room_left_for_a_response(tiny_model: Path) -> None:
    scorer = await started(tiny_model, max_length=32)
    try:
        room = scorer.response_room()
        assert room is not None and 0 < room < 32
        whole = " ".join(["calm"] * room)
        assert len(scorer._encode(scorer.format("", whole))) == 32
    finally:
        await scorer.close()


async def test_hf_inputs_are_built_off_the_event_loop(tiny_model: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = await started(tiny_model)
    threads: set[str] = set()
    original = scorer.format

    def recording(prompt: Any, response: str) -> str:
        threads.add(threading.current_thread().name)
        return original(prompt, response)

    monkeypatch.setattr(scorer, "format", recording)
    try:
        await scorer.score(["write a haiku"] * 2, RESPONSES[:2])
    finally:
        await scorer.close()
    assert threads and threading.main_thread().name not in threads


class TokenizingEngine:
    """A pooling engine with a real tokenizer that classifies by input length."""

    def __init__(self, folder: Path, max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.num_labels, self.label2id, self.max_model_len = 1, {}, max_model_len
        self.healthy = True
        self.seen: list[list[int]] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def reset_prefix_cache(self) -> bool:
        return True

    async def classify(self, token_ids: Sequence[int]) -> Classified:
        assert len(token_ids) <= self.max_model_len
        self.seen.append(list(token_ids))
        return Classified([float(sum(token_ids[-6:]))], len(token_ids), 0)


async def test_the_vllm_reward_fits_inputs_like_hf_off_the_loop(tiny_model: Path) -> None:
    engine = TokenizingEngine(tiny_model, max_model_len=32)
    scorer = VLLMRewardScorer(VLLMRewardConfig(name="rm", type="vllm", model=str(tiny_model)),
                              engine)
    await scorer.start()
    try:
        room = scorer.response_room()
        assert room is not None and 0 < room < 32
        scores = await scorer.score_block(query(LONG_PROMPT, RESPONSES))
        assert scores.truncated and len(set(scores.rewards)) == len(RESPONSES)
        full = [scorer.token_ids(LONG_PROMPT, r) for r in RESPONSES]
        cut = max(map(len, full)) - 32
        assert engine.seen == [ids[cut:] for ids in full]
        loop_thread = threading.current_thread().name
        threads: set[str] = set()
        original = scorer.token_ids

        def recording(prompt: Any, response: str) -> list[int]:
            threads.add(threading.current_thread().name)
            return original(prompt, response)

        scorer.token_ids = recording  # type: ignore[method-assign]
        await asyncio.gather(*(scorer.score(["write a haiku"], [r]) for r in RESPONSES))
        assert threads and loop_thread not in threads
        assert not (await scorer.score_block(query("write a haiku", RESPONSES))).truncated
    finally:
        await scorer.close()
