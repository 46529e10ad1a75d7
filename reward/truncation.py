"""Fitting reward-model inputs to the model's length without blinding it.

A reward model that reads only the first tokens of (prompt, response) loses the end of the
response, and with a long prompt all of it: every candidate then gets the same reward and
the selection is uniform. So inputs are cut where the conversation is oldest: the same
number of prompt tokens is dropped from every candidate of one prompt (after a leading
start-of-sequence token), which keeps each response whole, keeps what the candidates share
a shared prefix (KV reuse, prefix caching), and scores all of them against the same context.
A response that does not fit on its own is refused when the request is planned (400).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class LengthLimited(Protocol):
    """A reward that reads at most a fixed number of tokens (``hf``, ``vllm``)."""

    name: str

    def response_room(self) -> int | None:
        """Tokens a response may have and still be read whole (None until loaded)."""
        ...


class ResponseTooLong(ValueError):
    """The requested completion length cannot fit the reward model's input whole."""


def fit_group(inputs: Sequence[Sequence[int]], limit: int,
              keep_head: int = 0) -> tuple[list[list[int]], bool]:
    """Cut the same number of tokens from every input of one prompt so that all fit ``limit``.

    The tokens cut are the oldest after the first ``keep_head`` (a start-of-sequence token
    the model expects). Returns the inputs and whether anything was cut.
    """
    if not inputs:
        return [], False
    cut = max(len(ids) for ids in inputs) - limit
    if cut <= 0:
        return [list(ids) for ids in inputs], False
    return [list(ids[:keep_head]) + list(ids[keep_head + cut:]) for ids in inputs], True


def leading_special(ids: Sequence[int], special_id: int | None) -> int:
    """1 when ``ids`` start with ``special_id`` (a BOS to keep in front), else 0."""
    return int(special_id is not None and bool(ids) and ids[0] == special_id)


def check_response_room(scorer: object, max_tokens: int) -> None:
    """Raise :class:`ResponseTooLong` when ``max_tokens`` cannot fit ``scorer``'s input."""
    if not isinstance(scorer, LengthLimited):
        return
    room = scorer.response_room()
    if room is not None and max_tokens > room:
        raise ResponseTooLong(
            f"max_tokens = {max_tokens} cannot fit the reward '{scorer.name}', which reads a "
            f"response of at most {room} tokens whole; ask for at most {room} tokens or use "
            "another reward")
