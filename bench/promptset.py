"""Prompt sets for the measurement commands: the shipped one, or any JSONL file.

Each line is a JSON object with ``prompt`` (text, sent as one user message) or ``messages``
(a chat conversation), and an optional ``id``; a line that is a bare JSON string is a prompt.
Shipped sets are named: ``prompts`` (the default) and ``verifiable`` (instructions a program
checks, for the rewards of reward/verifiers.py; each line also lists its ``constraints``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from common.prompts import Message, Prompt

SHIPPED = "prompts.jsonl"
SHIPPED_SETS = {"prompts": SHIPPED, "verifiable": "verifiable.jsonl"}


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a set, as chat messages."""

    id: str
    prompt: Prompt

    def as_messages(self) -> list[dict[str, str]]:
        """The OpenAI ``messages`` for this prompt."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": m.role, "content": m.content} for m in self.prompt]


def _item(line: object, number: int) -> PromptItem:
    if isinstance(line, str):
        return PromptItem(f"p{number}", (Message("user", line),))
    if not isinstance(line, dict):
        raise ValueError(f"line {number}: expected an object or a string")
    ident = str(line.get("id", f"p{number}"))
    if "messages" in line:
        messages = tuple(Message(str(m["role"]), str(m["content"])) for m in line["messages"])
        return PromptItem(ident, messages)
    if "prompt" in line:
        return PromptItem(ident, (Message("user", str(line["prompt"])),))
    raise ValueError(f"line {number}: needs 'prompt' or 'messages'")


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[PromptItem]:
    """The prompts of ``path`` (a file, or a shipped set's name; the default set when None),
    at most ``limit`` of them."""
    if path is None or str(path) in SHIPPED_SETS:
        name = SHIPPED_SETS[str(path)] if path is not None else SHIPPED
        text = resources.files("bench").joinpath("data", name).read_text(encoding="utf-8")
    else:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    items = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                items.append(_item(json.loads(raw), number))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: not JSON ({exc.msg})") from exc
    if not items:
        raise ValueError("the prompt set is empty")
    return items[:limit] if limit else items
