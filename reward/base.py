"""The reward scorer contract shared by every backend.

A scorer maps parallel lists of prompts and responses to one float each. A prompt is
either plain text (completions) or a tuple of chat messages (chat completions), so a
reward model with a chat template can format the conversation as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from common.prompts import Prompt


class RewardError(RuntimeError):
    """A reward model could not score (not loaded, failed, or returned bad values)."""


@runtime_checkable
class RewardScorer(Protocol):
    """Scores (prompt, response) pairs; higher is better. Implementations are async-safe."""

    name: str

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Return one reward per pair, in order."""
        ...

    async def start(self) -> None:
        """Load weights or warm up; called once before the first request."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


def check_lengths(prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
