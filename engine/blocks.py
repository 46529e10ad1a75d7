"""The rules of one block shared by every decoding loop (selection, particles): a request's
inputs, where a stop string cuts the text, and why a response ends after its newest block.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from common.prompts import Prompt
from engine.types import Candidate, SamplingSettings, SBoNParams, ScoredCandidate
from reward.base import RewardScorer


@dataclass
class RequestInputs:
    """What one choice of a request needs, whichever loop runs it: its inputs, the reward
    and a seeded rng."""

    prompt: Prompt
    params: SBoNParams
    sampling: SamplingSettings
    request_id: str
    reward_name: str
    scorer: RewardScorer
    rng: random.Random
    prompt_ids: list[int]


def finish_reason(
    block_finish: str | None,
    *,
    blockwise: bool,
    stop_string_found: bool,
    response_tokens: int,
    max_tokens: int,
    context_full: bool,
    block_empty: bool,
    block_limit_reached: bool = False,
) -> str | None:
    """Why a response ends after its newest block, or None when another block follows.

    One rule, in order: the engine stopped the block (end of sequence or a stop string
    inside the block), or a stop string spans blocks -> ``stop``; per-response mode ends
    with its single block, as the engine ended it; a blockwise response that reached
    ``max_tokens``, the model's context or its maximum number of selections -> ``length``;
    a block with no tokens (nothing more to say) -> ``stop``. A block that ended at the
    block delimiter is not a stop: the caller passes ``block_finish=None`` for it.
    """
    if block_finish == "stop" or stop_string_found:
        return "stop"
    if not blockwise:
        return block_finish or "length"
    if response_tokens >= max_tokens or context_full or block_limit_reached:
        return "length"
    if block_empty:
        return "stop"
    return None


def end_of_block(
    request: RequestInputs, text: str, before: int, block: Candidate | ScoredCandidate, *,
    response_tokens: int, blocks_done: int, max_model_len: int,
) -> tuple[str, str | None]:
    """A response's text after its newest block and why it ends (None: another block).

    ``text`` already holds the block, whose characters start at ``before``. vLLM stops
    within a block; a stop string that spans two blocks is found and cut here. One rule for
    the selection loop and the particle filter.
    """
    sampling, params = request.sampling, request.params
    cut = None
    if params.blockwise and sampling.stop and (block.finish_reason != "stop"
                                               or block.stop_reason not in sampling.stop):
        cut = find_stop(text, sampling.stop, before)
    if cut is not None:
        text = text[:cut]
    at_step_end = bool(params.block_delimiter) and block.stop_reason == params.block_delimiter
    reason = finish_reason(
        None if at_step_end else block.finish_reason, blockwise=params.blockwise,
        stop_string_found=cut is not None, response_tokens=response_tokens,
        max_tokens=sampling.max_tokens,
        context_full=len(request.prompt_ids) + response_tokens >= max_model_len,
        block_empty=not block.token_ids,
        block_limit_reached=params.max_blocks is not None and blocks_done >= params.max_blocks)
    return text, reason


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string.

    Streaming holds those characters back until the next block shows whether the stop
    string completes, so no text after a stop string is ever sent.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string that ends at or after ``start``, if any."""
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index >= 0 and (best is None or index < best):
            best = index
    return best
