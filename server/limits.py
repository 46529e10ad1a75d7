"""Bounded work per request: counts and sizes, checked before any tokenising or generation.

A request's work is prompts x choices (OpenAI ``n``) x candidates (``sbon.n``) x tokens;
each factor has a limit in the ``limits`` section of the configuration, and so do the
characters the tokenizer and the stop-string search will read. Every violation is a 400
with code ``limit_exceeded`` naming the parameter; the body as a whole is bounded by the
413 of :class:`server.middleware.BodyLimitMiddleware` before it is even parsed.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.config import Limits
from server.errors import InvalidRequest
from server.protocol import ChatCompletionRequest, CompletionRequest, TextPart


def _exceeded(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param, "limit_exceeded")


def check_stops(stops: Sequence[str], block_delimiter: str | None) -> None:
    """Refuse a stop string equal to the block delimiter: a block ending there would be
    both a step boundary (go on) and a stop (end), and one of the two would be ignored."""
    if block_delimiter is not None and block_delimiter in stops:
        raise InvalidRequest(
            f"The stop sequence {block_delimiter!r} is also the block delimiter "
            "(sbon.block_delimiter, or the server's default): a block ending there cannot "
            "both end a step and stop the response. Remove it from stop, or choose another "
            "sbon.block_delimiter.", "stop", "invalid_value")


def check_request_size(request: CompletionRequest | ChatCompletionRequest,
                       limits: Limits) -> int:
    """Check counts and characters against ``limits``; return the number of prompts."""
    if isinstance(request, ChatCompletionRequest):
        _check_messages(request, limits)
        prompts = 1
    else:
        prompts = _check_prompts(request, limits)
    if request.n > limits.max_choices:
        raise _exceeded(f"n must be at most {limits.max_choices}", "n")
    total = prompts * request.n
    if total > limits.max_total_choices:
        raise _exceeded(f"{prompts} prompts x n = {request.n} make {total} choices; the "
                        f"maximum per request is {limits.max_total_choices}", "n")
    _check_stops(request.stop_list(), limits)
    return prompts


def _check_prompts(request: CompletionRequest, limits: Limits) -> int:
    if isinstance(request.prompt, str):
        _check_chars(request.prompt, limits.max_prompt_chars, "prompt")
        return 1
    if len(request.prompt) > limits.max_prompts:
        raise _exceeded(f"prompt may hold at most {limits.max_prompts} prompts, not "
                        f"{len(request.prompt)}", "prompt")
    for index, text in enumerate(request.prompt):
        _check_chars(text, limits.max_prompt_chars, f"prompt.{index}")
    return len(request.prompt)


def _check_messages(request: ChatCompletionRequest, limits: Limits) -> None:
    if len(request.messages) > limits.max_messages:
        raise _exceeded(f"messages may hold at most {limits.max_messages} messages, not "
                        f"{len(request.messages)}", "messages")
    total = 0
    for index, message in enumerate(request.messages):
        size = _chars(message.content)
        _check_size(size, limits.max_prompt_chars, f"messages.{index}.content")
        total += size
    _check_size(total, limits.max_prompt_chars, "messages")


def _chars(content: str | list[TextPart]) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text) for part in content)


def _check_chars(text: str, limit: int, param: str) -> None:
    _check_size(len(text), limit, param)


def _check_size(size: int, limit: int, param: str) -> None:
    if size > limit:
        raise _exceeded(f"{param} has {size} characters; the maximum is {limit} "
                        "(limits.max_prompt_chars)", param)


def _check_stops(stops: tuple[str, ...], limits: Limits) -> None:
    if len(stops) > limits.max_stop_sequences:
        raise _exceeded(f"at most {limits.max_stop_sequences} stop sequences, not {len(stops)}",
                        "stop")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        raise _exceeded(f"a stop sequence may have at most {limits.max_stop_chars} characters",
                        "stop")
