"""Soft best-of-n results as OpenAI response objects, stream chunks and ``sbon`` objects.

Pure functions from :class:`engine.types.SBoNResult` to JSON-ready data: the routes and the
streaming code call these, so the non-streaming and streaming shapes cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.report import block_summary, json_number
from engine.types import BlockRecord, SBoNResult

Kind = str  # "completion" or "chat"


@dataclass(frozen=True)
class ChoiceResult:
    """One returned choice: which prompt it answers, its index, and its result."""

    index: int
    prompt_index: int
    result: SBoNResult


def _block(block: BlockRecord, with_texts: bool) -> dict[str, Any]:
    out = block_summary(block)
    if with_texts:
        out["candidates"] = [c.text for c in block.candidates]
    return out


def sbon_object(result: SBoNResult, return_candidates: bool) -> dict[str, Any]:
    """The ``sbon`` object of one choice: settings, the selection, diagnostics, accounting."""
    params, final, d = result.params, result.final_block, result.diagnostics
    out: dict[str, Any] = {
        "n": params.n,
        "lambda": json_number(params.lam),
        "block_size": params.block_size,
        "normalize": params.normalize.value,
        "reward": result.reward_name if params.score else None,
        "scored": params.score,
    }
    if params.blockwise:
        out["blocks"] = [_block(b, return_candidates) for b in result.blocks]
    else:
        out["chosen_index"] = final.chosen_index
        if return_candidates:
            out["candidates"] = [c.text for c in final.candidates]
    if params.score:
        out["rewards"] = final.rewards
        out["weights"] = final.weights
    out.update({
        "ess": d.ess,
        "kl_from_uniform": d.kl_from_uniform,
        "kl_bon_bound": d.kl_bon_bound,
        "kl_estimate": d.kl_estimate,
        "win_rate_bound": d.win_rate_bound,
        "tokens_generated": result.tokens_generated,
        "tokens_scored": result.tokens_scored,
        "timings_s": dict(result.timings),
    })
    return out


def usage(choices: list[ChoiceResult]) -> dict[str, int]:
    """OpenAI usage: each prompt counted once, every returned completion counted."""
    prompt_tokens: dict[int, int] = {}
    for choice in choices:
        prompt_tokens[choice.prompt_index] = choice.result.prompt_tokens
    completion = sum(c.result.completion_tokens for c in choices)
    prompt = sum(prompt_tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def response_body(kind: Kind, response_id: str, created: int, model: str,
                  choices: list[ChoiceResult], show_sbon: bool,
                  return_candidates: bool) -> dict[str, Any]:
    """The whole non-streaming response."""
    rendered = []
    for choice in sorted(choices, key=lambda c: c.index):
        item: dict[str, Any] = {"index": choice.index}
        if kind == "chat":
            item["message"] = {"role": "assistant", "content": choice.result.text}
        else:
            item["text"] = choice.result.text
        item["logprobs"] = None
        item["finish_reason"] = choice.result.finish_reason
        if show_sbon:
            item["sbon"] = sbon_object(choice.result, return_candidates)
        rendered.append(item)
    return {
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": rendered,
        "usage": usage(choices),
    }


@dataclass(frozen=True)
class ChunkWriter:
    """Writes the SSE frames of one streamed response."""

    kind: Kind
    response_id: str
    created: int
    model: str
    include_usage: bool

    def _frame(self, choices: list[dict[str, Any]], usage_value: Any = None) -> str:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_value
        return f"data: {json.dumps(body)}\n\n"

    def _choice(self, index: int, text: str | None, finish_reason: str | None,
                role: bool = False) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            item["delta"] = delta
        else:
            item["text"] = text or ""
        item["logprobs"] = None
        item["finish_reason"] = finish_reason
        return item

    def opening(self, index: int) -> str | None:
        """Chat streams announce the assistant role first; completions have no such frame."""
        if self.kind != "chat":
            return None
        return self._frame([self._choice(index, "", None, role=True)])

    def text(self, index: int, text: str) -> str:
        return self._frame([self._choice(index, text, None)])

    def finish(self, index: int, result: SBoNResult, sbon: dict[str, Any] | None) -> str:
        item = self._choice(index, None if self.kind == "chat" else "", result.finish_reason)
        if sbon is not None:
            item["sbon"] = sbon
        return self._frame([item])

    def usage(self, choices: list[ChoiceResult]) -> str:
        return self._frame([], usage(choices))


DONE = "data: [DONE]\n\n"
