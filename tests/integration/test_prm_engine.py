"""Step-aligned soft best-of-n on the real engine with a process reward model (a tiny one
built from a config): each block is one step, and each candidate's reward is the PRM's score
of its newest step, read over the prompt and every step so far."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from tiny_models import build_tiny_prm

from common.config import PRMRewardConfig
from common.prompts import Message
from engine.sbon import SBoNEngine
from engine.types import SamplingSettings, SBoNParams
from reward.prm import PRMScorer

PROMPT = (Message("user", "Solve 12 * 7 step by step, one short step per line."),)


@pytest.mark.parametrize(("head", "fmt", "delimiter"), [
    ("causal", "step_tag", "\n"),
    ("token_classification", "token_classification", "."),
])
async def test_blockwise_steps_are_scored_by_their_newest_step(
        runtime, tmp_path: Path, head: str, fmt: str, delimiter: str) -> None:
    folder = build_tiny_prm(tmp_path / "prm", head=head)
    scorer = PRMScorer(PRMRewardConfig(name="prm", type="prm", model=str(folder), format=fmt,
                                       step_delimiter=delimiter, max_length=512))
    await scorer.start()
    try:
        groups: list[int] = []
        score_group = scorer._score_group

        def counted(prefix: list[int], members: list[int], items: list[Any]) -> Any:
            groups.append(len(members))
            return score_group(prefix, members, items)

        scorer._score_group = counted  # type: ignore[method-assign]
        engine = SBoNEngine(runtime.backend, {"prm": scorer}, "prm")
        size = 32
        result = await engine.run(
            PROMPT, SBoNParams(n=3, lam=1.0, block_size=size, block_delimiter=delimiter),
            SamplingSettings(max_tokens=96, seed=11), f"it-prm-{fmt}")
        assert result.reward_name == "prm" and len(result.blocks) >= 2
        # Candidates of a later block share the question and the earlier steps: that
        # prefix ran once for them.
        assert scorer.shares_prefix_kv and groups and max(groups) >= 2
        assert any(b.chosen.text.endswith(delimiter) for b in result.blocks[:-1])
        assert result.text == "".join(b.chosen.text for b in result.blocks)
        for block in result.blocks[:-1]:
            chosen = block.chosen
            assert chosen.text.endswith(delimiter) or len(chosen.token_ids) == size
        prefix = ""
        for block in result.blocks:
            assert all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in block.rewards)
            # The reward is the scorer's own score of (prompt, prefix + block): newest step.
            texts = [prefix + c.text for c in block.candidates]
            again = await scorer.score([PROMPT] * len(texts), texts)
            assert again == pytest.approx(block.rewards, abs=1e-5)
            prefix += block.chosen.text
    finally:
        await scorer.close()
