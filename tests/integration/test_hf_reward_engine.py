"""Soft best-of-n on the real engine with a real (tiny, built-from-config) Hugging Face reward
model: the co-located hf backend end to end, per response and blockwise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny_models import build_tiny_reward_model

from common.config import HFRewardConfig
from common.prompts import Message
from engine.sbon import SBoNEngine
from engine.types import SamplingSettings, SBoNParams
from reward.hf import HFRewardScorer

PROMPT = (Message("user", "Write a haiku about the sea."),)


async def test_the_hf_reward_scores_engine_candidates(runtime, tmp_path: Path) -> None:
    folder = build_tiny_reward_model(tmp_path / "rm")
    scorer = HFRewardScorer(HFRewardConfig(name="rm", type="hf", model=str(folder),
                                         max_length=256))
    await scorer.start()
    try:
        engine = SBoNEngine(runtime.backend, {"rm": scorer}, "rm")
        hard = await engine.run(PROMPT, SBoNParams(n=4, lam=0.0),
                                SamplingSettings(max_tokens=12, seed=4), "it-hf-hard")
        block = hard.blocks[0]
        assert block.rewards[block.chosen_index] == max(block.rewards)
        # The rewards are the model's own scores of (prompt, candidate text).
        again = await scorer.score([PROMPT] * 4, [c.text for c in block.candidates])
        assert again == pytest.approx(block.rewards, abs=1e-4)
        # The cost axis counts the tokens the reward model ran on (the shared prompt once,
        # its reuse by the other 3 candidates as cached: a multiple of 3).
        scoring = hard.prefill_scoring
        assert scoring.computed > 0 and scoring.cached > 0 and scoring.cached % 3 == 0
        assert hard.tokens_computed == (hard.tokens_generated + hard.prefill_generation.computed
                                        + hard.prefill_scoring.computed)
        blockwise = await engine.run(PROMPT, SBoNParams(n=3, lam=0.5, block_size=8),
                                     SamplingSettings(max_tokens=16, seed=5), "it-hf-block")
        assert blockwise.reward_name == "rm" and 1 <= len(blockwise.blocks) <= 2
        assert all(math.isfinite(r) for b in blockwise.blocks for r in b.rewards)
        assert blockwise.tokens_scored > 0
    finally:
        await scorer.close()
