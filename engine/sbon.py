"""The soft best-of-n decoding loop: generate n, score, select, append, repeat.

Per-response mode is the loop with one block as long as ``max_tokens``. Blockwise mode
(docs/maths.md, "Blockwise mode") continues from the token ids of the prefix (prompt plus
the blocks chosen so far), scores prefix+block and stops at end of sequence, at a stop
string (also one that spans two blocks) or at ``max_tokens``.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from common.prompts import Prompt
from engine.backend import GenerationBackend
from engine.blocks import RequestInputs, end_of_block, held_back
from engine.guarded import guard
from engine.particles import ParticleFilter
from engine.pruned import PrunableBackend, check_prune, pruned_step, prunes
from engine.resolve import SettingsError
from engine.seeds import block_seed
from engine.selection import (
    kl_bon_bound,
    kl_bon_estimate_from_logprob,
    select,
    win_rate_bound,
)
from engine.types import (
    BlockEvent,
    BlockRecord,
    Candidate,
    Diagnostics,
    PrefillTokens,
    PruneReport,
    SamplingSettings,
    SBoNParams,
    SBoNResult,
    ScoredCandidate,
    TextEvent,
)
from reward.base import BlockQuery, RewardScorer, score_block


class UnknownRewardError(KeyError):
    """The request named a reward that is not configured."""


@dataclass
class _Request(RequestInputs):
    """Everything one request carries through its blocks: its inputs and its progress."""

    response_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    tokens_generated: int = 0
    tokens_scored: int = 0
    finish_reason: str | None = None
    blocks: list[BlockRecord] = field(default_factory=list)
    pruning: PruneReport | None = None

    @property
    def block_index(self) -> int:
        """Index of the block being generated now."""
        return len(self.blocks)

    def engine_request_id(self) -> str:
        return f"{self.request_id}-b{self.block_index}"


class SBoNEngine:
    """Runs soft best-of-n requests over a generation backend and named reward scorers."""

    def __init__(
        self,
        backend: GenerationBackend,
        scorers: Mapping[str, RewardScorer],
        default_reward: str,
    ) -> None:
        if default_reward not in scorers:
            raise ValueError(f"default reward '{default_reward}' is not among the scorers")
        self.backend = backend
        # Every scorer behind the deadline and finite-value guard (engine/guarded.py).
        self.scorers = {name: guard(scorer) for name, scorer in scorers.items()}
        self.default_reward = default_reward

    def scorer_for(self, name: str | None) -> tuple[str, RewardScorer]:
        key = name or self.default_reward
        if key not in self.scorers:
            raise UnknownRewardError(key)
        return key, self.scorers[key]

    def check_prune(self, params: SBoNParams) -> None:
        """Refuse pruning the chosen reward or this engine cannot do (:class:`SettingsError`
        naming the setting), before any work."""
        if params.prune is None:
            return
        key, _ = self.scorer_for(params.reward)
        check_prune(params, self.scorers[key])
        if prunes(params) and not isinstance(self.backend, PrunableBackend):
            raise SettingsError("this engine cannot stop single candidates", "prune")

    async def run(self, prompt: Prompt, params: SBoNParams, sampling: SamplingSettings,
                  request_id: str, prompt_ids: Sequence[int] | None = None) -> SBoNResult:
        """Run a request to the end and return its result."""
        async for event in self.stream(prompt, params, sampling, request_id, prompt_ids):
            if isinstance(event, SBoNResult):
                return event
        raise RuntimeError("the soft best-of-n stream ended without its result")

    async def stream(
        self,
        prompt: Prompt,
        params: SBoNParams,
        sampling: SamplingSettings,
        request_id: str,
        prompt_ids: Sequence[int] | None = None,
        token_stream: bool = False,
    ) -> AsyncIterator[BlockEvent | TextEvent | SBoNResult]:
        """Yield one :class:`BlockEvent` per chosen block, then the :class:`SBoNResult`.

        With ``token_stream``, plain decoding (one candidate, no reward, one block) also
        yields :class:`TextEvent` deltas while the engine decodes, as a plain server would.
        """
        reward_name, scorer = self.scorer_for(params.reward)
        ids = list(prompt_ids) if prompt_ids is not None else self.backend.encode_prompt(prompt)
        rng = random.Random(sampling.seed) if sampling.seed is not None else random.Random()
        if params.particles and params.blockwise:
            particles = ParticleFilter(self.backend, RequestInputs(
                prompt, params, sampling, request_id, reward_name, scorer, rng, ids))
            async for event in particles.stream():
                yield event
            return
        request = _Request(prompt, params, sampling, request_id, reward_name, scorer, rng, ids)
        plain = token_stream and params.n == 1 and not params.score and not params.blockwise
        while request.finish_reason is None:
            steps = self._plain_step(request) if plain else self._step(request)
            async for item in steps:
                if isinstance(item, TextEvent):
                    yield item
                else:
                    request.blocks.append(item)
            delta = self._append(request)
            yield BlockEvent(block=request.blocks[-1], text_delta=delta,
                             finished=request.finish_reason is not None)
        yield self._result(request)

    async def _step(self, request: _Request) -> AsyncIterator[BlockRecord]:
        """One block: n candidates from the prefix, scored and one of them drawn."""
        sampling, params = request.sampling, request.params
        if prunes(params):
            yield await self._pruned_step(request)
            return
        remaining = sampling.max_tokens - len(request.response_ids)
        size = min(params.block_size or remaining, remaining)
        if params.block_delimiter:
            sampling = replace(sampling, block_delimiter=params.block_delimiter)
        started = time.perf_counter()
        candidates = await self.backend.generate(
            request.prompt_ids + request.response_ids, params.n, sampling, size,
            request.engine_request_id(), block_seed(sampling.seed, request.block_index))
        yield await self._select(request, candidates, started)

    async def _pruned_step(self, request: _Request) -> BlockRecord:
        """The single selection of a per-response request with early pruning."""
        if not isinstance(self.backend, PrunableBackend):
            raise SettingsError("this engine cannot stop single candidates", "prune")
        step = await pruned_step(
            self.backend, self.scorers[request.reward_name], request.prompt,
            request.prompt_ids, request.params, request.sampling, request.engine_request_id(),
            request.rng, self.backend.kv_block_tokens)
        request.pruning = step.report
        request.tokens_scored += step.tokens_scored
        request.tokens_generated += sum(len(c.token_ids) for c in step.record.candidates)
        return step.record

    async def _plain_step(self, request: _Request) -> AsyncIterator[TextEvent | BlockRecord]:
        """The single block of plain decoding, streamed token by token."""
        started = time.perf_counter()
        sampling = request.sampling
        candidate: Candidate | None = None
        async for item in self.backend.generate_stream(
                request.prompt_ids, sampling, sampling.max_tokens, request.engine_request_id(),
                block_seed(sampling.seed, 0)):
            if isinstance(item, Candidate):
                candidate = item
            else:
                request.emitted += len(item)  # already sent: the block event releases no text
                yield TextEvent(item)
        if candidate is None:
            raise RuntimeError("the backend's stream ended without its candidate")
        yield await self._select(request, [candidate], started)

    async def _select(self, request: _Request, candidates: list[Candidate],
                      started: float) -> BlockRecord:
        """Score the block's candidates (prefix + block), draw one, and record the step."""
        params = request.params
        generated = time.perf_counter()
        scoring = PrefillTokens()
        truncated = False
        if params.score:
            scores = await score_block(request.scorer, BlockQuery(
                prompt=request.prompt, prompt_ids=request.prompt_ids,
                prefix_text=request.text, prefix_ids=request.response_ids,
                block_texts=[c.text for c in candidates],
                block_ids=[c.token_ids for c in candidates]))
            rewards = scores.rewards
            scoring = PrefillTokens(scores.computed_tokens, scores.cached_tokens)
            truncated = scores.truncated
            request.tokens_scored += sum(len(request.response_ids) + c.num_tokens
                                         for c in candidates)
        else:
            rewards = [0.0] * len(candidates)
        scored = time.perf_counter()
        selection = select(rewards, params.lam, request.rng, params.normalize,
                           kl_budget=params.kl_budget)
        chosen = candidates[selection.chosen_index]
        selected = time.perf_counter()
        request.tokens_generated += sum(c.num_tokens for c in candidates)
        return BlockRecord(
            index=request.block_index,
            candidates=[_scored(c, r, w) for c, r, w in zip(candidates, rewards,
                                                            selection.weights, strict=True)],
            chosen_index=selection.chosen_index,
            ess=selection.ess,
            kl_from_uniform=selection.kl_from_uniform,
            kl_estimate=kl_bon_estimate_from_logprob(params.n, chosen.cumulative_logprob),
            lam=selection.lam,
            generation_s=generated - started,
            scoring_s=scored - generated,
            selection_s=selected - scored,
            prefill_generation=sum((c.prefill for c in candidates), PrefillTokens()),
            prefill_scoring=scoring,
            reward_truncated=truncated,
        )

    def _append(self, request: _Request) -> str:
        """Append the newest chosen block to the response; return the text it releases."""
        chosen = request.blocks[-1].chosen
        sampling = request.sampling
        before = len(request.text)
        request.response_ids.extend(chosen.token_ids)
        request.text, request.finish_reason = end_of_block(
            request, request.text + chosen.text, before, chosen,
            response_tokens=len(request.response_ids), blocks_done=len(request.blocks),
            max_model_len=self.backend.max_model_len)
        end = len(request.text)
        if request.finish_reason is None:
            end -= held_back(request.text, sampling.stop)
        delta = request.text[request.emitted : end]
        request.emitted = max(request.emitted, end)
        return delta

    def _result(self, request: _Request) -> SBoNResult:
        blocks, params = request.blocks, request.params
        selections = len(blocks)
        diagnostics = Diagnostics(
            ess=sum(b.ess for b in blocks) / selections,
            kl_from_uniform=sum(b.kl_from_uniform for b in blocks),
            kl_bon_bound=kl_bon_bound(params.n) * selections,
            kl_estimate=sum(b.kl_estimate for b in blocks),
            win_rate_bound=win_rate_bound(params.n),
        )
        timings = {
            "generation": sum(b.generation_s for b in blocks),
            "scoring": sum(b.scoring_s for b in blocks),
            "selection": sum(b.selection_s for b in blocks),
        }
        return SBoNResult(
            text=request.text,
            token_ids=list(request.response_ids),
            finish_reason=request.finish_reason or "length",
            params=params,
            reward_name=request.reward_name,
            blocks=list(blocks),
            diagnostics=diagnostics,
            prompt_tokens=len(request.prompt_ids),
            tokens_generated=request.tokens_generated,
            tokens_scored=request.tokens_scored,
            timings=timings,
            prefill_generation=sum((b.prefill_generation for b in blocks), PrefillTokens()),
            prefill_scoring=sum((b.prefill_scoring for b in blocks), PrefillTokens()),
            pruning=request.pruning,
        )


def _scored(candidate: Candidate, reward: float, weight: float) -> ScoredCandidate:
    return ScoredCandidate(
        text=candidate.text,
        token_ids=candidate.token_ids,
        reward=float(reward),
        weight=weight,
        cumulative_logprob=candidate.cumulative_logprob,
        finish_reason=candidate.finish_reason,
        stop_reason=candidate.stop_reason,
    )
