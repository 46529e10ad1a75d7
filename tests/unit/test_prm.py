"""The process reward backend on tiny randomly initialised PRMs built from a config.

Each format's step scores are compared with a direct reference computation written here
with plain transformers: one forward pass over the whole text, a softmax, and the positions
picked the way the public PRMs' own examples pick them.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from tiny_models import PRM_SEPARATOR, STEP_TAG, build_tiny_prm

from common.config import AppConfig, PRMRewardConfig
from common.prompts import Message
from reward.base import BlockQuery, RewardError
from reward.prm import PRMScorer, aggregate, split_steps
from reward.registry import build_scorer

QUESTION = "one two three"
RESPONSES = [
    "the sea is blue\n\nwaves crash on rocks\n\nso the sea is calm",
    "the sea\n\nwaves crash",
    "a haiku about the sea",
    "the sea is blue\n\nwaves crash on rocks\n\ncalm",
    "",
]
# One block's candidates: the same earlier steps, a different newest step each.
PREFIX = "the sea is blue\n\nwaves crash on rocks\n\n"
BLOCK = [PREFIX + "so the sea is calm", PREFIX + "calm", PREFIX + "rocks = blue\n\n",
         PREFIX + "one"]


@pytest.fixture(scope="module")
def causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_prm(tmp_path_factory.mktemp("tiny-prm"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_prm(tmp_path_factory.mktemp("tiny-prm-tc"), head="token_classification")


def model_for(fmt: str, causal: Path, classifier: Path) -> Path:
    return classifier if fmt == "token_classification" else causal


async def started(model: Path, **extra: Any) -> PRMScorer:
    scorer = PRMScorer(PRMRewardConfig(name="prm", type="prm", model=str(model), **extra))
    await scorer.start()
    return scorer


# -- the reference computations ------------------------------------------------------------


def reference_steps(fmt: str, model_dir: Path, question: str, steps: list[str]) -> list[float]:
    """Every step's score, computed directly over the full text."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if fmt == "token_classification":
        model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
        answer = PRM_SEPARATOR.join(steps) + PRM_SEPARATOR
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        separator = tokenizer.convert_tokens_to_ids(PRM_SEPARATOR)
        picked = logits[ids[0] == separator]
        return picked.softmax(dim=-1)[:, 1].tolist()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    labels = [tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")]
    if fmt == "step_tag":
        text = f"{question} " + "\n".join(f"{step} {STEP_TAG}" for step in steps)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        positions = (ids[0] == tokenizer.convert_tokens_to_ids(STEP_TAG)).nonzero()[:, 0]
    else:  # chat: read where the assistant's label for each step would be generated
        turns: list[dict[str, str]] = []
        for index, step in enumerate(steps):
            content = f"{question} {step}" if index == 0 else step
            turns.append({"role": "user", "content": content})
            turns.append({"role": "assistant", "content": "+"})
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        positions = torch.tensor([
            len(tokenizer(tokenizer.apply_chat_template(
                turns[: 2 * k + 1], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]) - 1
            for k in range(len(steps))])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    pair = logits[positions][:, labels]
    return pair.softmax(dim=-1)[:, 0].tolist()


def reference(fmt: str, model_dir: Path, response: str, how: str = "last") -> float:
    steps = [s.strip() for s in response.split("\n\n") if s.strip()] or [response.strip()]
    values = reference_steps(fmt, model_dir, QUESTION, steps)
    if how == "last":
        return values[-1]
    return min(values) if how == "min" else math.prod(values)


FORMATS = ["step_tag", "chat", "token_classification"]


# -- scores equal the reference ------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["last", "min", "prod"])
async def test_scores_equal_the_reference_computation(fmt: str, how: str, causal: Path,
                                                      classifier: Path) -> None:
    model_dir = model_for(fmt, causal, classifier)
    scorer = await started(model_dir, format=fmt, aggregation=how)
    try:
        responses = RESPONSES + BLOCK
        values = await scorer.score([QUESTION] * len(responses), responses)
        expected = [reference(fmt, model_dir, r, how) for r in responses]
        assert values == pytest.approx(expected, abs=1e-5)
        assert all(0.0 <= v <= 1.0 for v in values)
    finally:
        await scorer.close()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_step_is_scored_like_the_reference(fmt: str, causal: Path,
                                                       classifier: Path) -> None:
    model_dir = model_for(fmt, causal, classifier)
    scorer = await started(model_dir, format=fmt, aggregation="min")
    try:
        steps = scorer.step_scores([QUESTION], [RESPONSES[0]])[0]
        assert len(steps) == 3
        assert steps == pytest.approx(reference_steps(
            fmt, model_dir, QUESTION, split_steps(RESPONSES[0], "\n\n")), abs=1e-5)
        assert len(set(round(v, 7) for v in steps)) > 1  # the steps are told apart
    finally:
        await scorer.close()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_shared_prefix_kv_gives_the_full_computation_values(fmt: str, causal: Path,
                                                                  classifier: Path) -> None:
    model_dir = model_for(fmt, causal, classifier)
    shared = await started(model_dir, format=fmt, aggregation="prod", max_batch_tokens=64)
    full = await started(model_dir, format=fmt, aggregation="prod", share_prefix_kv=False)
    try:
        assert shared.shares_prefix_kv and not full.shares_prefix_kv
        # A block's candidates share the question and the earlier steps, token for token.
        encoded = [shared.encode(shared.render(QUESTION, r)) for r in BLOCK]
        assert encoded[0].prefix is not None
        assert all(e.prefix == encoded[0].prefix for e in encoded)
        calls: list[int] = []
        group = shared._score_group

        def spy(prefix: list[int], members: list[int], items: list[Any]) -> Any:
            calls.append(len(members))
            return group(prefix, members, items)

        shared._score_group = spy  # type: ignore[method-assign]
        values = await shared.score([QUESTION] * len(BLOCK), BLOCK)
        assert calls == [len(BLOCK)]  # the prefix ran once for the whole block
        assert values == pytest.approx(await full.score([QUESTION] * len(BLOCK), BLOCK),
                                       abs=1e-5)
    finally:
        await shared.close()
        await full.close()


async def test_a_block_reports_the_tokens_the_model_ran_on(causal: Path) -> None:
    shared = await started(causal, format="step_tag", aggregation="prod")
    full = await started(causal, format="step_tag", aggregation="prod", share_prefix_kv=False)
    try:
        encoded = [full.encode(full.render(QUESTION, r)) for r in BLOCK]
        prefix = encoded[0].prefix
        assert prefix is not None
        query = BlockQuery(prompt=QUESTION, prompt_ids=[], prefix_text="", prefix_ids=[],
                           block_texts=BLOCK, block_ids=[() for _ in BLOCK])
        alone = await full.score_block(query)
        whole = sum(len(e.ids) for e in encoded)
        assert (alone.computed_tokens, alone.cached_tokens) == (whole, 0)
        together = await shared.score_block(query)  # the question and earlier steps once
        assert together.cached_tokens == len(prefix) * (len(BLOCK) - 1) > 0
        assert together.computed_tokens == whole - together.cached_tokens
        assert together.rewards == pytest.approx(alone.rewards, abs=1e-5)
    finally:
        await shared.close()
        await full.close()


# -- aggregation, batching, prompts ----------------------------------------------------------


def test_steps_and_aggregation() -> None:
    assert split_steps("a\n\nb\n\n", "\n\n") == ["a", "b"]
    assert split_steps(" a \n\n\n\n b", "\n\n") == ["a", "b"]
    assert split_steps("", "\n\n") == [""]
    assert aggregate([0.9, 0.2, 0.5], "last") == 0.5
    assert aggregate([0.9, 0.2, 0.5], "min") == 0.2
    assert aggregate([0.9, 0.2, 0.5], "prod") == pytest.approx(0.09)


async def test_aggregations_relate_as_expected(causal: Path) -> None:
    scorers = {how: await started(causal, aggregation=how) for how in ("last", "min", "prod")}
    try:
        values = {how: await s.score([QUESTION], [RESPONSES[0]]) for how, s in scorers.items()}
        assert values["prod"][0] <= values["min"][0] <= values["last"][0]
    finally:
        for scorer in scorers.values():
            await scorer.close()


async def test_concurrent_requests_share_batches_and_get_their_own_results(
        causal: Path) -> None:
    scorer = await started(causal, batch_wait_ms=20)
    try:
        expected = await scorer.score([QUESTION] * len(BLOCK), BLOCK)
        first, second = await asyncio.gather(scorer.score([QUESTION] * 2, BLOCK[:2]),
                                             scorer.score([QUESTION] * 2, BLOCK[2:]))
        assert first + second == pytest.approx(expected, abs=1e-5)
        alone = [(await scorer.score([QUESTION], [r]))[0] for r in BLOCK]
        assert alone == pytest.approx(expected, abs=1e-5)
    finally:
        await scorer.close()


async def test_a_failing_request_does_not_fail_the_batch_it_shared(causal: Path) -> None:
    scorer = await started(causal, batch_wait_ms=50)
    real = scorer._score_queries

    def breaks_on_boom(queries: list[Any]) -> list[float]:
        if any(q.response == "boom" for q in queries):
            raise ValueError("boom")
        return real(queries)

    scorer._score_queries = breaks_on_boom  # type: ignore[method-assign]
    try:
        bad, good = await asyncio.gather(scorer.score([QUESTION], ["boom"]),
                                         scorer.score([QUESTION], [BLOCK[0]]),
                                         return_exceptions=True)
        assert isinstance(bad, RewardError) and "boom" not in str(bad)
        assert good == pytest.approx([reference("step_tag", causal, BLOCK[0])], abs=1e-5)
    finally:
        await scorer.close()


async def test_a_chat_prompt_is_read_as_its_last_user_message(causal: Path) -> None:
    scorer = await started(causal)
    try:
        chat = (Message("system", "be brief"), Message("user", QUESTION))
        assert await scorer.score([chat], [BLOCK[0]]) == pytest.approx(
            await scorer.score([QUESTION], [BLOCK[0]]), abs=1e-6)
    finally:
        await scorer.close()


async def test_a_long_input_loses_its_oldest_tokens_first(causal: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = await started(causal, max_length=16)
    try:
        value = (await scorer.score([QUESTION], [RESPONSES[0]]))[0]
        tokenizer = AutoTokenizer.from_pretrained(causal)
        model = AutoModelForCausalLM.from_pretrained(causal).eval()
        text = f"{QUESTION} " + "\n".join(
            f"{s} {STEP_TAG}" for s in split_steps(RESPONSES[0], "\n\n"))
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, -16:]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        pair = logits[[tokenizer.convert_tokens_to_ids("+"),
                       tokenizer.convert_tokens_to_ids("-")]]
        assert value == pytest.approx(float(pair.softmax(dim=-1)[0]), abs=1e-5)
    finally:
        await scorer.close()


# -- configuration and errors ----------------------------------------------------------------


def test_configuration_and_registry(causal: Path) -> None:
    config = AppConfig(rewards=[{"name": "steps", "type": "prm", "model": str(causal),
                                 "format": "chat", "aggregation": "min"}],
                       default_reward="steps")
    entry = config.rewards[0]
    assert isinstance(entry, PRMRewardConfig)
    assert entry.good_token == "+" and entry.step_delimiter == "\n\n"
    assert entry.step_tag == STEP_TAG
    assert isinstance(build_scorer(entry, None), PRMScorer)
    with pytest.raises(ValueError):
        PRMRewardConfig(name="p", type="prm", model="m", format="bidirectional")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PRMRewardConfig(name="p", type="prm", model="m", aggregation="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PRMRewardConfig(name="p", type="prm", model="m", step_tag_typo="x")  # type: ignore[call-arg]


@pytest.mark.parametrize("field", ["good_token", "bad_token"])
async def test_a_label_that_is_not_one_token_is_a_clear_error(field: str, causal: Path) -> None:
    with pytest.raises(RewardError, match=f"{field} '\\+ \\+' is not a single token"):
        await started(causal, **{field: "+ +"})


async def test_equal_labels_and_missing_models_are_errors(causal: Path, tmp_path: Path) -> None:
    with pytest.raises(RewardError, match="same token"):
        await started(causal, bad_token="+")
    with pytest.raises(RewardError, match="cannot load"):
        await started(tmp_path / "absent")


async def test_scoring_before_start_is_a_reward_error(causal: Path) -> None:
    scorer = PRMScorer(PRMRewardConfig(name="prm", type="prm", model=str(causal)))
    with pytest.raises(RewardError, match="not loaded"):
        await scorer.score([QUESTION], ["the sea"])
    with pytest.raises(ValueError):
        await scorer.score([QUESTION], [])
