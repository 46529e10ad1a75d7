"""``engine.blocks.finish_reason``: why a response ends after its newest block, one case each."""

from __future__ import annotations

from typing import Any

from engine.blocks import finish_reason


def decide(**changes: Any) -> str | None:
    """The decision for a blockwise block in the middle of a response, with ``changes``."""
    state: dict[str, Any] = {
        "block_finish": "length",  # the block used its whole token budget
        "blockwise": True,
        "stop_string_found": False,
        "response_tokens": 4,
        "max_tokens": 10,
        "context_full": False,
        "block_empty": False,
    }
    state.update(changes)
    block_finish = state.pop("block_finish")
    return finish_reason(block_finish, **state)


def test_a_block_in_the_middle_of_a_response_is_followed_by_another() -> None:
    assert decide() is None


def test_end_of_sequence_or_a_stop_string_inside_the_block_is_stop() -> None:
    assert decide(block_finish="stop") == "stop"
    assert decide(block_finish="stop", blockwise=False) == "stop"


def test_the_engine_stop_wins_over_a_full_token_budget() -> None:
    assert decide(block_finish="stop", response_tokens=10) == "stop"
    assert decide(block_finish="stop", context_full=True) == "stop"


def test_a_stop_string_spanning_blocks_is_stop() -> None:
    assert decide(stop_string_found=True) == "stop"
    assert decide(stop_string_found=True, response_tokens=10) == "stop"


def test_a_per_response_answer_ends_with_its_blocks_own_reason() -> None:
    assert decide(blockwise=False) == "length"
    assert decide(blockwise=False, block_finish="abort") == "abort"


def test_a_per_response_answer_without_an_engine_reason_ends_with_length() -> None:
    assert decide(blockwise=False, block_finish=None) == "length"
    assert decide(blockwise=False, block_finish=None, response_tokens=1) == "length"


def test_a_blockwise_response_at_max_tokens_is_length() -> None:
    assert decide(response_tokens=10) == "length"
    assert decide(response_tokens=11) == "length"
    assert decide(response_tokens=9) is None


def test_a_blockwise_response_that_fills_the_context_is_length() -> None:
    assert decide(context_full=True) == "length"
    assert decide(context_full=True, block_empty=True) == "length"


def test_an_empty_block_is_stop() -> None:
    assert decide(block_empty=True, block_finish=None) == "stop"
    assert decide(block_empty=True) == "stop"
