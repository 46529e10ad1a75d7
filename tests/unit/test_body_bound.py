"""The value bound that decides where a request body is decoded, and the check that runs in
the worker process for bodies above it (server/body_parsing.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import Limits
from server.body_parsing import (
    IN_PROCESS_VALUES,
    _LazyProcessPool,
    first_error,
    value_bound,
    value_count,
)
from server.protocol import ChatCompletionRequest, CompletionRequest

# Text that looks like JSON structure, the key of a content part, and escapes.
TRICKY = st.sampled_from(['"type"', '{"type":"text","text":"a"}', ",", ":", "[", "{", "\\",
                          '"', "\u00e9", "\ud7ff", "\n", "type", "\u0074ype"])
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=5)), max_size=6).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)), max_leaves=40)
DUMPS = st.sampled_from([{}, {"ensure_ascii": False}, {"separators": (",", ":")},
                         {"indent": 2}, {"separators": (" , ", " : ")}])


def exact_count(value: Any) -> int:
    """Values and keys, counted on the decoded document."""
    if isinstance(value, list):
        return 1 + sum(exact_count(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(1 + exact_count(item) for item in value.values())
    return 1


def raw(value: Any, options: dict[str, Any]) -> bytes:
    return json.dumps(value, **options).encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None)
@given(VALUES, DUMPS)
def test_bound_is_never_below_the_exact_count(value: Any, options: dict[str, Any]) -> None:
    assert value_bound(raw(value, options)) >= exact_count(value) == value_count(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(TEXT, max_size=8), min_size=1, max_size=5), DUMPS)
def test_bound_is_never_below_the_content_parts(texts: list[list[str]],
                                                options: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": t} for t in parts]}
        for parts in texts]}
    assert value_bound(raw(body, options)) >= sum(len(parts) for parts in texts)


def test_bound_is_tight_for_dense_structure() -> None:
    # Not a useless bound: for the shape the limit is about it is within a small factor.
    parts = [{"type": "text", "text": "a"}] * 1000
    encoded = raw({"messages": [{"role": "user", "content": parts}]}, {})
    assert exact_count(json.loads(encoded)) <= value_bound(encoded) <= 2 * exact_count(
        json.loads(encoded))


def escaped_parts_body(parts: int) -> bytes:
    # "\u0074ype" decodes to "type": these parts are valid but hold no literal "type".
    part = b'{"\\u0074ype":"text","text":"a"}'
    return (b'{"model":"m","messages":[{"role":"user","content":['
            + b",".join([part] * parts) + b"]}]}")


def test_first_error_counts_parts_whose_keys_are_escaped() -> None:
    body = escaped_parts_body(10)
    assert b'"type"' not in body
    context = {"limits": Limits(max_content_parts=4)}
    error = first_error(ChatCompletionRequest, body, context)
    assert error is not None and error["type"] == "limit_exceeded"
    assert error["loc"] == ("body", "messages") and "not 10" in error["msg"]
    assert first_error(ChatCompletionRequest, escaped_parts_body(4), context) is None


def test_first_error_is_small_whatever_the_body() -> None:
    error = first_error(ChatCompletionRequest, b'{"model": "m", "messages": [', None)
    assert error == {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}
    error = first_error(ChatCompletionRequest, escaped_parts_body(5000),
                        {"limits": Limits()})
    assert error is not None and len(json.dumps(error)) < 300  # not the 5000 parts back


def test_worker_process_refuses_and_is_replaced_when_it_dies() -> None:
    pool = _LazyProcessPool()
    context = {"limits": Limits()}
    body = escaped_parts_body(IN_PROCESS_VALUES // 3)
    assert value_bound(body) > IN_PROCESS_VALUES

    async def check() -> dict[str, Any] | None:
        return await pool.first_error(ChatCompletionRequest, body, context)

    try:
        error = asyncio.run(check())
        assert error is not None and error["type"] == "limit_exceeded"
        assert pool._pool is not None
        for pid in list(pool._pool._processes or {}):
            os.kill(pid, signal.SIGKILL)
        assert asyncio.run(check()) is None  # the body is then parsed in the serving process
        assert pool._pool is None
        error = asyncio.run(check())  # a new worker
        assert error is not None and error["type"] == "limit_exceeded"
    finally:
        if pool._pool is not None:
            pool._pool.shutdown()


def test_bodies_too_costly_to_decode_here_get_the_serving_layer_checks() -> None:
    context = {"limits": Limits()}
    lists = b",".join([b"[]"] * IN_PROCESS_VALUES)
    error = first_error(CompletionRequest, b'{"model":"m","prompt":"a","logit_bias":['
                        + lists + b"]}", context)
    assert error == {"invalid_request": (
        "The parameter 'logit_bias' is not supported by this server.", "logit_bias",
        "unsupported_parameter")}
    stops = b",".join([b'"a"'] * IN_PROCESS_VALUES)
    error = first_error(CompletionRequest, b'{"model":"m","prompt":"a","stop":[' + stops
                        + b"]}", context)
    assert error is not None and error["invalid_request"][1:] == ("stop", "limit_exceeded")
    # The same body with few values is left to the serving layer, as any light body.
    assert first_error(CompletionRequest, b'{"model":"m","prompt":"a","stop":["a","b"]}',
                       context) is None


def test_nesting_deeper_than_the_recursion_limit_is_invalid_json() -> None:
    error = first_error(CompletionRequest, b"[" * 100_000, {"limits": Limits()})
    assert error is not None and error["type"] == "json_invalid"


def test_value_count_is_exact() -> None:
    assert value_count([]) == 1 and value_count({"a": [1, {"b": None}]}) == 7
