"""Every body the server sends is exactly one of the response models of ``server/protocol.py``.

Each non-streaming body and each stream chunk is validated against its model and written
back with the server's own serialiser; the two must be equal, so a body cannot carry a
field the model lacks, lack a required one, or hold a value of another type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import httpx
import pytest
from api_harness import Served
from pydantic import BaseModel

from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    ModelList,
    to_json,
)

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (name, path, body): requests that cover both modes, every ``sbon`` option that changes the
# ``sbon`` object's fields, several prompts and choices, and (on a server whose default is
# plain decoding) responses without ``sbon``.
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("chat-per-response", CHAT, {"messages": MESSAGES, "max_tokens": 5, "seed": 1,
                                 "sbon": {"n": 3, "lambda": 0.5}}),
    ("chat-candidates", CHAT, {"messages": MESSAGES, "max_tokens": 5, "seed": 2,
                               "sbon": {"n": 3, "lambda": 0, "return_candidates": True}}),
    ("chat-blockwise", CHAT, {"messages": MESSAGES, "max_tokens": 6, "seed": 3,
                              "sbon": {"n": 2, "block_size": 2, "return_candidates": True}}),
    ("chat-one-candidate", CHAT, {"messages": MESSAGES, "max_tokens": 4,
                                  "sbon": {"n": 1}}),
    ("chat-lambda-inf", CHAT, {"messages": MESSAGES, "max_tokens": 4, "seed": 4,
                               "sbon": {"n": 2, "lambda": "inf", "normalize": "zscore"}}),
    ("chat-defaults", CHAT, {"messages": MESSAGES, "max_completion_tokens": 3, "n": 2}),
    ("completion-prompts", COMPLETIONS, {"prompt": ["one two three four", "five"], "n": 2,
                                         "max_tokens": 3, "seed": 5, "sbon": {"n": 2}}),
    ("completion-blockwise", COMPLETIONS, {"prompt": "hello", "max_tokens": 5, "seed": 6,
                                           "sbon": {"n": 2, "block_size": 2,
                                                    "reward": "other"}}),
    ("chat-plain", CHAT, {"messages": MESSAGES, "max_tokens": 4, "seed": 7}),
    ("completion-plain", COMPLETIONS, {"prompt": ["a b", "c"], "max_tokens": 3, "n": 2}),
]
PLAIN_BY_DEFAULT = {"chat-plain", "completion-plain"}

Response: TypeAlias = ChatCompletionResponse | CompletionResponse
Chunk: TypeAlias = ChatCompletionChunk | CompletionChunk
MODELS: dict[str, tuple[type[Response], type[Chunk]]] = {
    CHAT: (ChatCompletionResponse, ChatCompletionChunk),
    COMPLETIONS: (CompletionResponse, CompletionChunk),
}
Model = TypeVar("Model", bound=BaseModel)


def exactly(model: type[Model], body: dict[str, Any]) -> Model:
    """``body`` validated as ``model``; fails unless writing it back gives ``body`` again."""
    parsed = model.model_validate(body)
    assert to_json(parsed) == body, f"not exactly a {model.__name__}: {body}"
    return parsed


def stream_frames(served: Served, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", f"{served.url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return [line[len("data: "):] for line in response.iter_lines() if line]


def server_for(name: str, server_factory: Callable[..., Served]) -> Served:
    """The default server, or one whose requests without ``sbon`` get plain decoding."""
    return server_factory(sbon={"enabled": name not in PLAIN_BY_DEFAULT})


@pytest.mark.parametrize(("name", "path", "body"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_every_response_body_is_exactly_its_model(server_factory: Callable[..., Served],
                                                  name: str, path: str,
                                                  body: dict[str, Any]) -> None:
    response = server_for(name, server_factory).post(path, {"model": "fake-model", **body})
    assert response.status_code == 200, response.text
    parsed = exactly(MODELS[path][0], response.json())
    assert isinstance(parsed, ChatCompletionResponse | CompletionResponse)
    assert [c.index for c in parsed.choices] == list(range(len(parsed.choices)))
    assert len(parsed.choices) == body.get("n", 1) * (len(body["prompt"]) if isinstance(
        body.get("prompt"), list) else 1)
    with_sbon = {c.sbon is not None for c in parsed.choices}
    assert with_sbon == {name not in PLAIN_BY_DEFAULT}


@pytest.mark.parametrize(("name", "path", "body"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_every_stream_chunk_is_exactly_its_model(server_factory: Callable[..., Served],
                                                 name: str, path: str,
                                                 body: dict[str, Any]) -> None:
    frames = stream_frames(server_for(name, server_factory), path, {
        "model": "fake-model", **body, "stream": True,
        "stream_options": {"include_usage": True}})
    assert frames[-1] == "[DONE]"
    chunks = [exactly(MODELS[path][1], json.loads(frame)) for frame in frames[:-1]]
    assert all(isinstance(c, ChatCompletionChunk | CompletionChunk) for c in chunks)
    *content, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert all(c.choices and c.usage is None for c in content)
    finished = [choice for c in content for choice in c.choices
                if choice.finish_reason is not None]
    assert len(finished) == len({choice.index for choice in finished}) >= 1
    assert {choice.sbon is not None for choice in finished} == {name not in PLAIN_BY_DEFAULT}


def test_a_stream_without_usage_sends_no_usage_chunk(served: Served) -> None:
    frames = stream_frames(served, CHAT, {"model": "fake-model", "messages": MESSAGES,
                                          "max_tokens": 4, "stream": True,
                                          "sbon": {"n": 2, "block_size": 2}})
    chunks = [exactly(ChatCompletionChunk, json.loads(f)) for f in frames[:-1]]
    assert all("usage" not in json.loads(f) for f in frames[:-1])
    assert all(c.choices for c in chunks)


def test_the_model_list_is_exactly_its_model(served: Served) -> None:
    response = httpx.get(f"{served.url}/v1/models", timeout=30)
    assert response.status_code == 200
    parsed = exactly(ModelList, response.json())
    assert [m.id for m in parsed.data] == ["fake-model"]


def test_the_exact_check_refuses_a_field_the_model_lacks() -> None:
    body: dict[str, Any] = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    exactly(ChatCompletionResponse, body)
    body["choices"][0]["surprise"] = 1
    with pytest.raises(AssertionError, match="not exactly"):
        exactly(ChatCompletionResponse, body)
    body["choices"][0].pop("surprise")
    body["created"] = "1"
    with pytest.raises(AssertionError, match="not exactly"):
        exactly(ChatCompletionResponse, body)
