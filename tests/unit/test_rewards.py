"""Reward backends without the engine: python callables, batching, the judge's arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from common.config import JudgeRewardConfig, PythonRewardConfig
from common.prompts import Message, Prompt, conversation, prompt_as_text
from reward.base import BlockQuery, RewardError
from reward.callables import load_callable
from reward.hf import token_budget_batches
from reward.judge import JudgeScorer, LabelLogprobs
from reward.python_fn import PythonScorer
from reward.registry import build_scorer


def python_reward(function: str) -> PythonScorer:
    return PythonScorer(PythonRewardConfig(name="r", type="python", function=function))


async def test_python_reward_calls_the_function_per_pair() -> None:
    scorer = python_reward("reward.rules:response_length")
    assert await scorer.score(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    overlap = python_reward("reward.rules:keyword_overlap")
    values = await overlap.score(["Describe the ocean waves"], ["ocean waves crash"])
    assert values == [pytest.approx(2 / 3)]


async def _async_reward(prompt: str, response: str) -> float:
    return 1.5


def _failing_reward(prompt: str, response: str) -> float:
    raise RuntimeError("boom")


async def test_python_reward_awaits_async_functions_and_wraps_failures() -> None:
    assert await python_reward(f"{__name__}:_async_reward").score(["p"], ["r"]) == [1.5]
    with pytest.raises(RewardError):
        await python_reward(f"{__name__}:_failing_reward").score(["p"], ["r"])
    with pytest.raises(ValueError):
        await python_reward("reward.rules:response_length").score(["p"], ["a", "b"])


def test_load_callable_reports_bad_specs() -> None:
    for spec in ("reward.rules:absent", "no_such_module_xyz:f", "reward.rules"):
        with pytest.raises(ValueError):
            load_callable(spec)


def test_prompt_rendering() -> None:
    chat = (Message("system", "be brief"), Message("user", "hi"))
    assert prompt_as_text("hi") == "hi"
    assert prompt_as_text(chat) == "system: be brief\nuser: hi"
    assert conversation(chat, "hello")[-1] == {"role": "assistant", "content": "hello"}
    assert conversation("hi", "yo")[0] == {"role": "user", "content": "hi"}


def test_token_budget_batches_respect_the_budget_and_cover_everything() -> None:
    lengths = [5, 50, 7, 200, 9, 30, 31, 6]
    batches = token_budget_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert longest * len(batch) <= 100 or len(batch) == 1


class FakeJudgeEngine:
    """Token ids are characters; the judge says Yes to queries that contain "good"."""

    max_model_len = 4096

    def __init__(self) -> None:
        self.asked: list[tuple[list[int], Sequence[str]]] = []

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return [ord(c) for c in prompt_as_text(prompt) + "\n"]

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def follow_up_ids(self, question: str) -> list[int]:
        return self.encode_text(f"\nQ: {question}\nA:")

    async def label_logprobs(self, token_ids: Sequence[int],
                             labels: Sequence[str]) -> LabelLogprobs:
        self.asked.append((list(token_ids), labels))
        text = "".join(chr(t) for t in token_ids)
        values = [-0.5, -2.0] if "good" in text else [-3.0, -0.1]
        return LabelLogprobs(values, computed_tokens=len(token_ids), cached_tokens=0)


async def test_judge_reward_is_the_yes_no_margin() -> None:
    source = FakeJudgeEngine()
    judge = build_scorer(JudgeRewardConfig(name="j", type="judge"), source)
    assert isinstance(judge, JudgeScorer)
    values = await judge.score(["q", "q"], ["a good answer", "bad"])
    assert values == [pytest.approx(1.5), pytest.approx(-2.9)]
    asked, labels = source.asked[0]
    assert labels == ("Yes", "No")
    # The query is laid out shared part first: prompt, response, then the question.
    text = "".join(chr(t) for t in asked)
    assert text.startswith("q\na good answer\nQ: ") and text.endswith("\nA:")


async def test_judge_block_queries_use_the_engine_token_ids() -> None:
    source = FakeJudgeEngine()
    judge = build_scorer(JudgeRewardConfig(name="j", type="judge", question="Good?"), source)
    assert isinstance(judge, JudgeScorer)
    query = BlockQuery(prompt="q", prompt_ids=[1, 2], prefix_text="ab", prefix_ids=[3],
                       block_texts=["x", "y"], block_ids=[[4], [5, 6]])
    scores = await judge.score_block(query)
    suffix = source.follow_up_ids("Good?")
    assert [ids for ids, _ in source.asked] == [[1, 2, 3, 4, *suffix], [1, 2, 3, 5, 6, *suffix]]
    assert scores.computed_tokens == 2 * len(suffix) + 9 and scores.cached_tokens == 0
    assert scores.rewards == [pytest.approx(-2.9)] * 2


def test_judge_template_must_have_both_slots() -> None:
    with pytest.raises(ValueError):
        JudgeScorer(JudgeRewardConfig(name="j", type="judge", judge_template="{prompt} only"),
                    FakeJudgeEngine())
    with pytest.raises(ValueError):
        build_scorer(JudgeRewardConfig(name="j", type="judge"), None)
