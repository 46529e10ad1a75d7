"""Step-aligned blocks and the KL budget on the real engine: each block ends at the first
delimiter (kept) or at ``block_size`` tokens, and every selection solves its own lambda."""

from __future__ import annotations

import math

import pytest

from common.prompts import Message
from engine.types import SamplingSettings, SBoNParams

PROMPT = (Message("user", "Give four short facts about the sea, one sentence each."),)


async def test_every_non_final_block_ends_at_the_delimiter(runtime) -> None:
    size = 48
    result = await runtime.sbon.run(
        PROMPT, SBoNParams(n=3, lam=1.0, block_size=size, block_delimiter="."),
        SamplingSettings(max_tokens=96, seed=21), "it-steps")
    assert len(result.blocks) >= 2
    for block in result.blocks[:-1]:
        chosen = block.chosen
        # A step ends with its delimiter, unless it ran to the block size first.
        assert chosen.text.endswith(".") or len(chosen.token_ids) == size
        assert chosen.text.count(".") <= 1 or not chosen.text.endswith(".")
    assert any(b.chosen.text.endswith(".") for b in result.blocks[:-1])
    assert result.text == "".join(b.chosen.text for b in result.blocks)
    assert result.finish_reason in {"stop", "length"}
    assert len(result.token_ids) <= 96


async def test_a_client_stop_string_still_ends_the_response_without_being_returned(
        runtime) -> None:
    # Steps end at a comma; the client stops at the first full stop.
    result = await runtime.sbon.run(
        PROMPT, SBoNParams(n=2, lam=1.0, block_size=32, block_delimiter=","),
        SamplingSettings(max_tokens=96, seed=4, stop=(".",)), "it-steps-stop")
    if result.finish_reason != "stop":
        pytest.skip("the response ran to its length without a full stop")
    assert "." not in result.text
    assert result.blocks[-1].chosen.stop_reason in {".", None} or result.blocks[-1].chosen.\
        finish_reason == "stop"


async def test_the_kl_budget_sets_lambda_per_block(runtime) -> None:
    result = await runtime.sbon.run(
        PROMPT, SBoNParams(n=4, block_size=16, kl_budget=0.25),
        SamplingSettings(max_tokens=48, seed=8), "it-kl-budget")
    for block in result.blocks:
        assert block.kl_from_uniform <= 0.25 + 1e-9
        if 0 < block.lam < math.inf:
            assert block.kl_from_uniform == pytest.approx(0.25, abs=1e-6)
