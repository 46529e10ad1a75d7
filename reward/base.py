"""The reward scorer contract shared by every backend.

A scorer maps parallel lists of prompts and responses to one float each. A prompt is
either plain text (completions) or a tuple of chat messages (chat completions), so a
reward model with a chat template can format the conversation as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


Prompt = str | tuple[Message, ...]


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


def prompt_as_text(prompt: Prompt) -> str:
    """Plain-text rendering of a prompt for models without a chat template."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    """The (prompt, response) pair as chat-template messages."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in prompt]
    return [*messages, {"role": "assistant", "content": response}]


def check_lengths(prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
