"""Prompts as every layer sees them: plain text (completions) or chat messages.

A reward model with a chat template formats the conversation as it was trained, so chat
prompts stay structured until the layer that renders them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


Prompt = str | tuple[Message, ...]


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat-template messages (a plain-text prompt is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    """The (prompt, response) pair as chat-template messages."""
    return [*chat_messages(prompt), {"role": "assistant", "content": response}]


def prompt_as_text(prompt: Prompt) -> str:
    """Plain-text rendering of a prompt for models without a chat template."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)
