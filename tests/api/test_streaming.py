"""Server-sent events in OpenAI's chunk format: blockwise, per-response, usage, errors."""

from __future__ import annotations

import json

import httpx
from api_harness import Served
from fakes import FakeScorer

from reward.base import RewardError

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def frames(served: Served, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{served.url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in response.iter_lines() if line]


def test_blockwise_chat_stream_sends_each_chosen_block(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, stream=True,  # type: ignore
        stream_options={"include_usage": True}, seed=4,
        extra_body={"sbon": {"n": 2, "lambda": 0.5, "block_size": 2}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices
               and c.choices[0].delta.content]
    assert len(content) == 3  # one chunk per chosen block, sent as it was chosen
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    sbon = final[0].choices[0].model_extra["sbon"]  # type: ignore[index]
    assert len(sbon["blocks"]) == 3
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 6
    # The streamed text equals the non-streamed answer to the same seeded request.
    again = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=4,  # type: ignore
        extra_body={"sbon": {"n": 2, "lambda": 0.5, "block_size": 2}})
    assert "".join(content) == again.choices[0].message.content


def test_per_response_stream_sends_the_chosen_text_after_selection(served: Served) -> None:
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 5, "seed": 12,
            "sbon": {"n": 3, "lambda": 0.5}}
    raw = frames(served, "/v1/completions", {**body, "stream": True})
    assert raw[-1] == "[DONE]"
    chunks = [json.loads(f) for f in raw[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    assert len(texts) == 1
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length" and last["sbon"]["chosen_index"] in range(3)
    # The streamed text and selection equal the non-streamed answer to the same seed.
    whole = served.post("/v1/completions", body).json()["choices"][0]
    assert texts[0] == whole["text"] and whole["text"]
    assert last["sbon"]["chosen_index"] == whole["sbon"]["chosen_index"]
    assert last["sbon"]["rewards"] == whole["sbon"]["rewards"]


def test_several_choices_stream_with_their_indices(served: Served) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 4, "n": 2, "seed": 13,
            "sbon": {"n": 2, "block_size": 2}}
    raw = frames(served, "/v1/chat/completions", {**body, "stream": True})
    chunks = [json.loads(f) for f in raw[:-1]]
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        choice = chunk["choices"][0]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
    # Each index streams the text of the same choice of the non-streamed seeded answer.
    whole = served.post("/v1/chat/completions", body).json()["choices"]
    assert streamed == {c["index"]: c["message"]["content"] for c in whole}
    assert streamed[0] != streamed[1]  # two independent draws, told apart by their index


def test_an_error_after_the_stream_started_is_an_error_frame_then_done(server_factory) -> None:
    class Failing(FakeScorer):
        async def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            if len(self.seen) >= 2:  # the first block scores, the second fails
                raise RewardError("the reward model went away")
            return await super().score(prompts, responses)

    served = server_factory(scorers={"fake": Failing(), "other": FakeScorer()})
    raw = frames(served, "/v1/chat/completions", {
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 6, "stream": True,
        "sbon": {"n": 2, "block_size": 2}})
    assert raw[-1] == "[DONE]"
    error = json.loads(raw[-2])["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "reward_unavailable"
    assert "went away" not in error["message"]  # internal details stay in the log
    assert any("delta" in json.loads(f).get("choices", [{}])[0] for f in raw[:-2])


def test_plain_decoding_streams_tokens_as_they_decode(server_factory) -> None:
    served = server_factory(sbon={"enabled": False})
    stream = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=5, seed=14,  # type: ignore
        stream=True)
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(content) == 5  # one chunk per decoded piece, not one after the whole response
    assert all("sbon" not in (c.choices[0].model_extra or {}) for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=5, seed=14)  # type: ignore
    assert "".join(content) == whole.choices[0].message.content
