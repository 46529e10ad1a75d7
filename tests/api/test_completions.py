"""Completions and chat completions through the official ``openai`` client."""

from __future__ import annotations

import math

import httpx
import pytest
from api_harness import Served

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def test_chat_completion_carries_the_sbon_object(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=1,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 3, "lambda": 0.5, "return_candidates": True}})
    assert reply.object == "chat.completion" and reply.model == "fake-model"
    choice = reply.choices[0]
    sbon = choice.model_extra["sbon"]  # type: ignore[index]
    assert sbon["n"] == 3 and sbon["lambda"] == 0.5 and sbon["block_size"] is None
    assert len(sbon["rewards"]) == len(sbon["weights"]) == len(sbon["candidates"]) == 3
    assert sum(sbon["weights"]) == pytest.approx(1.0)
    assert choice.message.content == sbon["candidates"][sbon["chosen_index"]]
    assert sbon["reward"] == "fake" and sbon["scored"] is True
    assert 1.0 <= sbon["ess"] <= 3.0 and 0.0 <= sbon["kl_from_uniform"] <= math.log(3)
    assert sbon["win_rate_bound"] == pytest.approx(3 / 4)
    assert sbon["tokens_generated"] == 3 * 6 and sbon["tokens_scored"] == 3 * 6
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    # The rewards are the fake scorer's (minus the text length): the record is consistent.
    assert sbon["rewards"] == [-float(len(t)) for t in sbon["candidates"]]


def test_blockwise_hard_best_of_n_records_every_block(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=2,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 2, "lambda": 0, "block_size": 2, "reward": "other",
                             "return_candidates": True}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert len(sbon["blocks"]) == 3 and sbon["reward"] == "other"
    text = ""
    for block in sbon["blocks"]:
        assert block["rewards"][block["chosen_index"]] == max(block["rewards"])
        text += block["candidates"][block["chosen_index"]]
    assert reply.choices[0].message.content == text
    assert sbon["kl_bon_bound"] == pytest.approx(3 * (math.log(2) - 0.5))
    assert reply.choices[0].finish_reason == "length"


def test_request_without_sbon_uses_the_configured_defaults(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["n"] == 4 and sbon["lambda"] == 1.0 and "candidates" not in sbon


def test_plain_decoding_when_sbon_is_off_by_default(server_factory) -> None:
    served = server_factory(sbon={"enabled": False})
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert "sbon" not in (reply.choices[0].model_extra or {})
    assert served.backend.calls[-1].n == 1
    assert all(not s.seen for s in served.scorers.values())  # no reward was paid for


def test_one_candidate_is_the_base_model_and_pays_no_reward(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 1}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["scored"] is False and "rewards" not in sbon and sbon["tokens_scored"] == 0
    assert all(not s.seen for s in served.scorers.values())


def test_completions_with_several_prompts_and_choices(served: Served) -> None:
    reply = served.client().completions.create(
        model="fake-model", prompt=["one two three four five", "six"], n=2, max_tokens=3,
        seed=5, extra_body={"sbon": {"n": 2, "lambda": "inf"}})
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.model_extra["sbon"]["lambda"] == "inf" for c in reply.choices)  # type: ignore
    assert all(c.model_extra["sbon"]["weights"] == [0.5, 0.5] for c in reply.choices)  # type: ignore
    # Prompts are counted once each (5 words -> 5 tokens, 1 word -> 3 tokens).
    assert reply.usage is not None and reply.usage.prompt_tokens == 5 + 3
    assert reply.usage.completion_tokens == 4 * 3
    # Each returned choice is an independent draw: distinct seeds, the first keeps the request's.
    seeds = {c.seed for c in served.backend.calls}
    assert 5 in seeds and len(seeds) == 2


def test_sampling_parameters_pass_through(served: Served) -> None:
    served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_completion_tokens=5,  # type: ignore[arg-type]
        temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3, presence_penalty=0.5,
        frequency_penalty=0.25, user="someone", extra_body={"top_k": 20, "sbon": {"n": 2}})
    sampling = served.backend.sampling_seen[-1]
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 0.9, 20)
    assert sampling.stop == ("\n\n",) and sampling.seed == 3 and sampling.max_tokens == 5
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, 0.25)


def test_a_seeded_request_is_reproducible(served: Served) -> None:
    client = served.client()

    def ask() -> tuple[str, list[int]]:
        reply = client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=6, seed=9,  # type: ignore
            extra_body={"sbon": {"n": 4, "lambda": 2.0, "block_size": 2}})
        blocks = reply.choices[0].model_extra["sbon"]["blocks"]  # type: ignore[index]
        return reply.choices[0].message.content or "", [b["chosen_index"] for b in blocks]

    assert ask() == ask()


def test_models_and_openapi(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    document = served.post("/openapi.json", {}).status_code  # POST is not allowed
    assert document == 405
    spec = httpx.get(f"{served.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
            "/metrics"} <= set(spec["paths"])
    assert "SBoNOptions" in spec["components"]["schemas"]
