"""Soft best-of-n results as OpenAI response objects, stream chunks and ``sbon`` objects.

Every body is built from the typed response models in :mod:`server.protocol` (one
definition for the OpenAPI document and the wire), and the non-streaming and streaming
shapes share the ``sbon`` builder, so they cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from common.values import json_number
from engine.types import BlockRecord, PruneReport, SBoNResult
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
    SBoNBlock,
    SBoNInfo,
    SBoNParticles,
    SBoNPrune,
    Usage,
    to_json,
)

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class ChoiceResult:
    """One returned choice: which prompt it answers, its index, and its result."""

    index: int
    prompt_index: int
    result: SBoNResult


def _rewards(block: BlockRecord) -> list[float | Literal["inf", "-inf"]]:
    return [json_number(r) for r in block.rewards]


def _block(block: BlockRecord, with_texts: bool) -> SBoNBlock:
    out = SBoNBlock.model_validate({
        "index": block.index, "chosen_index": block.chosen_index, "rewards": _rewards(block),
        "weights": block.weights, "ess": block.ess, "kl_from_uniform": block.kl_from_uniform,
        "kl_estimate": block.kl_estimate, "lambda": json_number(block.lam)})
    if with_texts:
        out.candidates = [c.text for c in block.candidates]
    if block.particles is not None:
        out.resampled = block.particles.resampled
        if block.particles.ancestors is not None:
            out.ancestors = list(block.particles.ancestors)
    return out


def sbon_info(result: SBoNResult, return_candidates: bool) -> SBoNInfo:
    """The ``sbon`` object of one choice: settings, the selection, diagnostics, accounting."""
    params, final, d = result.params, result.final_block, result.diagnostics
    fields: dict[str, Any] = {
        "n": params.n,
        "lambda": None if params.kl_budget is not None else json_number(params.lam),
        "kl_budget": params.kl_budget,
        "lambdas": [json_number(b.lam) for b in result.blocks],
        "block_size": params.block_size,
        "block_delimiter": params.block_delimiter,
        "normalize": params.normalize.value,
        "reward": result.reward_name if params.score else None,
        "scored": params.score,
    }
    if params.blockwise:
        fields["blocks"] = [_block(b, return_candidates) for b in result.blocks]
    else:
        fields["chosen_index"] = final.chosen_index
        if return_candidates:
            fields["candidates"] = [c.text for c in final.candidates]
    if params.score:
        fields["rewards"] = _rewards(final)
        fields["weights"] = final.weights
    if params.particles and params.blockwise:
        fields["particles"] = SBoNParticles(
            ess_threshold=params.ess_threshold,
            resamplings=sum(1 for b in result.blocks if b.particles and b.particles.resampled))
    if result.reward_truncated:
        fields["reward_truncated"] = True
    if result.pruning is not None:
        fields["prune"] = _prune(result.pruning)
        if "rewards" in fields:  # a pruned candidate has no final reward
            fields["rewards"] = [None if at is not None else r for r, at in
                                 zip(fields["rewards"], result.pruning.pruned_at, strict=True)]
    fields.update(
        ess=d.ess, kl_from_uniform=d.kl_from_uniform, kl_bon_bound=d.kl_bon_bound,
        kl_estimate=d.kl_estimate, win_rate_bound=d.win_rate_bound,
        tokens_generated=result.tokens_generated, tokens_scored=result.tokens_scored,
        tokens_computed=result.tokens_computed,
        tokens_prefilled={"generation": result.prefill_generation.computed,
                          "scoring": result.prefill_scoring.computed},
        tokens_cached={"generation": result.prefill_generation.cached,
                       "scoring": result.prefill_scoring.cached},
        timings_s=dict(result.timings))
    return SBoNInfo(**fields)


def _prune(report: PruneReport) -> SBoNPrune:
    return SBoNPrune(mode=report.mode, every=report.every, checkpoints=report.checkpoints,
                     pruned=report.pruned, pruned_at=list(report.pruned_at),
                     distortion_bound=report.distortion_bound)


def sbon_object(result: SBoNResult, return_candidates: bool) -> dict[str, Any]:
    """The ``sbon`` object as JSON."""
    return to_json(sbon_info(result, return_candidates))


def usage(choices: list[ChoiceResult]) -> Usage:
    """OpenAI usage: each prompt counted once, every returned completion counted."""
    prompt_tokens: dict[int, int] = {}
    for choice in choices:
        prompt_tokens[choice.prompt_index] = choice.result.prompt_tokens
    completion = sum(c.result.completion_tokens for c in choices)
    prompt = sum(prompt_tokens.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def response_body(kind: Kind, response_id: str, created: int, model: str,
                  choices: list[ChoiceResult], show_sbon: bool,
                  return_candidates: bool) -> dict[str, Any]:
    """The whole non-streaming response."""
    ordered = sorted(choices, key=lambda c: c.index)

    def extra(choice: ChoiceResult) -> dict[str, Any]:
        return {"sbon": sbon_info(choice.result, return_candidates)} if show_sbon else {}

    body: ChatCompletionResponse | CompletionResponse
    if kind == "chat":
        body = ChatCompletionResponse(
            id=response_id, object="chat.completion", created=created, model=model,
            choices=[ChatChoice(index=c.index, logprobs=None,
                                message=AssistantMessage(role="assistant", content=c.result.text),
                                finish_reason=c.result.finish_reason, **extra(c))
                     for c in ordered],
            usage=usage(choices))
    else:
        body = CompletionResponse(
            id=response_id, object="text_completion", created=created, model=model,
            choices=[CompletionChoice(index=c.index, text=c.result.text, logprobs=None,
                                      finish_reason=c.result.finish_reason, **extra(c))
                     for c in ordered],
            usage=usage(choices))
    return to_json(body)


@dataclass(frozen=True)
class ChunkWriter:
    """Writes the SSE frames of one streamed response."""

    kind: Kind
    response_id: str
    created: int
    model: str
    include_usage: bool

    def _frame(self, choices: list[dict[str, Any]], usage_value: Usage | None = None) -> str:
        head: dict[str, Any] = {"id": self.response_id, "created": self.created,
                                "model": self.model}
        if self.include_usage:
            head["usage"] = usage_value
        body: ChatCompletionChunk | CompletionChunk
        if self.kind == "chat":
            body = ChatCompletionChunk(object="chat.completion.chunk", choices=[
                ChatChunkChoice(**c) for c in choices], **head)
        else:
            body = CompletionChunk(object="text_completion", choices=[
                CompletionChunkChoice(**c) for c in choices], **head)
        return f"data: {json.dumps(to_json(body))}\n\n"

    def _choice(self, index: int, text: str | None, finish_reason: str | None,
                role: bool = False) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if self.kind == "chat":
            delta = ChatDelta(role="assistant") if role else ChatDelta()
            if text is not None:
                delta.content = text
            item["delta"] = delta
        else:
            item["text"] = text or ""
        return item

    def opening(self, index: int) -> str | None:
        """Chat streams announce the assistant role first; completions have no such frame."""
        if self.kind != "chat":
            return None
        return self._frame([self._choice(index, "", None, role=True)])

    def text(self, index: int, text: str) -> str:
        return self._frame([self._choice(index, text, None)])

    def finish(self, index: int, result: SBoNResult, sbon: SBoNInfo | None) -> str:
        item = self._choice(index, None if self.kind == "chat" else "", result.finish_reason)
        if sbon is not None:
            item["sbon"] = sbon
        return self._frame([item])

    def usage(self, choices: list[ChoiceResult]) -> str:
        return self._frame([], usage(choices))


DONE = "data: [DONE]\n\n"
