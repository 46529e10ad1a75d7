"""The soft best-of-n decoding loop: generate n, score, select, append, repeat.

Per-response mode is the loop with one block as long as ``max_tokens``. Blockwise mode
[SBoN, section on sequences] continues from the token ids of the prefix (prompt plus the
blocks chosen so far), scores prefix+block and stops at end of sequence, at a stop string
(also one that spans two blocks) or at ``max_tokens``.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from engine.backend import GenerationBackend
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
    SamplingSettings,
    SBoNParams,
    SBoNResult,
    ScoredCandidate,
    TextEvent,
)
from reward.base import Prompt, RewardScorer


class UnknownRewardError(KeyError):
    """The request named a reward that is not configured."""


@dataclass
class _State:
    """Mutable progress of one request through its blocks."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    tokens_generated: int = 0
    tokens_scored: int = 0
    finish_reason: str | None = None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string.

    Streaming holds those characters back until the next block shows whether the stop
    string completes, so no text after a stop string is ever sent.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string that ends at or after ``start``, if any."""
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index >= 0 and (best is None or index < best):
            best = index
    return best


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
        self.scorers = dict(scorers)
        self.default_reward = default_reward

    def scorer_for(self, name: str | None) -> tuple[str, RewardScorer]:
        key = name or self.default_reward
        if key not in self.scorers:
            raise UnknownRewardError(key)
        return key, self.scorers[key]

    async def run(
        self,
        prompt: Prompt,
        params: SBoNParams,
        sampling: SamplingSettings,
        request_id: str,
        prompt_ids: Sequence[int] | None = None,
    ) -> SBoNResult:
        """Run a request to the end and return its result."""
        result: SBoNResult | None = None
        async for event in self.stream(prompt, params, sampling, request_id, prompt_ids):
            if isinstance(event, SBoNResult):
                result = event
        assert result is not None  # stream always ends with the result
        return result

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
        state = _State(prompt_ids=ids, response_ids=[])
        rng = random.Random(sampling.seed) if sampling.seed is not None else random.Random()
        plain = token_stream and params.n == 1 and not params.score and not params.blockwise
        blocks: list[BlockRecord] = []
        while state.finish_reason is None:
            if plain:
                steps = self._plain_step(prompt, params, sampling, request_id, scorer, state, rng)
            else:
                steps = self._one_step(prompt, params, sampling, request_id, scorer, state, rng,
                                       len(blocks))
            async for item in steps:
                if isinstance(item, TextEvent):
                    yield item
                else:
                    blocks.append(item)
            delta = self._append(blocks[-1].chosen, params, sampling, state)
            finished = state.finish_reason is not None
            yield BlockEvent(block=blocks[-1], text_delta=delta, finished=finished)
        yield self._result(params, reward_name, blocks, state)

    async def _one_step(self, prompt: Prompt, params: SBoNParams, sampling: SamplingSettings,
                        request_id: str, scorer: RewardScorer, state: _State,
                        rng: random.Random, index: int) -> AsyncIterator[BlockRecord]:
        yield await self._step(prompt, params, sampling, request_id, scorer, state, rng, index)

    async def _plain_step(self, prompt: Prompt, params: SBoNParams, sampling: SamplingSettings,
                          request_id: str, scorer: RewardScorer, state: _State,
                          rng: random.Random) -> AsyncIterator[TextEvent | BlockRecord]:
        """The single block of plain decoding, streamed token by token."""
        started = time.perf_counter()
        candidate: Candidate | None = None
        async for item in self.backend.generate_stream(
                state.prompt_ids, sampling, sampling.max_tokens, f"{request_id}-b0",
                block_seed(sampling.seed, 0)):
            if isinstance(item, Candidate):
                candidate = item
            else:
                state.emitted += len(item)  # already sent: the block event releases no text
                yield TextEvent(item)
        if candidate is None:
            raise RuntimeError("the backend's stream ended without its candidate")
        yield await self._select(prompt, params, scorer, state, rng, 0, [candidate], started)

    async def _step(
        self,
        prompt: Prompt,
        params: SBoNParams,
        sampling: SamplingSettings,
        request_id: str,
        scorer: RewardScorer,
        state: _State,
        rng: random.Random,
        index: int,
    ) -> BlockRecord:
        remaining = sampling.max_tokens - len(state.response_ids)
        size = min(params.block_size or remaining, remaining)
        started = time.perf_counter()
        candidates = await self.backend.generate(
            state.prompt_ids + state.response_ids,
            params.n,
            sampling,
            size,
            f"{request_id}-b{index}",
            block_seed(sampling.seed, index),
        )
        return await self._select(prompt, params, scorer, state, rng, index, candidates, started)

    async def _select(self, prompt: Prompt, params: SBoNParams, scorer: RewardScorer,
                      state: _State, rng: random.Random, index: int,
                      candidates: list[Candidate], started: float) -> BlockRecord:
        """Score the block's candidates (prefix + block), draw one, and record the step."""
        generated = time.perf_counter()
        responses = [state.text + c.text for c in candidates]
        if params.score:
            rewards = await scorer.score([prompt] * len(candidates), responses)
        else:
            rewards = [0.0] * len(candidates)
        scored = time.perf_counter()
        selection = select(rewards, params.lam, rng, params.normalize)
        chosen = candidates[selection.chosen_index]
        selected = time.perf_counter()
        state.tokens_generated += sum(c.num_tokens for c in candidates)
        if params.score:
            state.tokens_scored += sum(len(state.response_ids) + c.num_tokens for c in candidates)
        return BlockRecord(
            index=index,
            candidates=[_scored(c, r, w) for c, r, w in zip(candidates, rewards,
                                                            selection.weights, strict=True)],
            chosen_index=selection.chosen_index,
            ess=selection.ess,
            kl_from_uniform=selection.kl_from_uniform,
            kl_estimate=kl_bon_estimate_from_logprob(params.n, chosen.cumulative_logprob),
            generation_s=generated - started,
            scoring_s=scored - generated,
            selection_s=selected - scored,
        )

    def _append(
        self,
        chosen: ScoredCandidate,
        params: SBoNParams,
        sampling: SamplingSettings,
        state: _State,
    ) -> str:
        """Append the chosen block to the response; return the text it releases."""
        before = len(state.text)
        state.response_ids.extend(chosen.token_ids)
        state.text += chosen.text
        if chosen.finish_reason == "stop":
            state.finish_reason = "stop"
        elif params.blockwise and sampling.stop:
            cut = find_stop(state.text, sampling.stop, before)
            if cut is not None:
                state.text = state.text[:cut]
                state.finish_reason = "stop"
        if state.finish_reason is None:
            total = len(state.prompt_ids) + len(state.response_ids)
            at_limit = total >= self.backend.max_model_len
            if not params.blockwise or len(state.response_ids) >= sampling.max_tokens or at_limit:
                state.finish_reason = chosen.finish_reason or "length"
                if params.blockwise:
                    state.finish_reason = "length"
            elif chosen.token_ids == ():
                state.finish_reason = "stop"
        end = len(state.text)
        if state.finish_reason is None:
            end -= held_back(state.text, sampling.stop)
        delta = state.text[state.emitted : end]
        state.emitted = max(state.emitted, end)
        return delta

    def _result(
        self, params: SBoNParams, reward_name: str, blocks: list[BlockRecord], state: _State
    ) -> SBoNResult:
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
            text=state.text,
            token_ids=list(state.response_ids),
            finish_reason=state.finish_reason or "length",
            params=params,
            reward_name=reward_name,
            blocks=blocks,
            diagnostics=diagnostics,
            prompt_tokens=len(state.prompt_ids),
            tokens_generated=state.tokens_generated,
            tokens_scored=state.tokens_scored,
            timings=timings,
        )


def _scored(candidate: Candidate, reward: float, weight: float) -> ScoredCandidate:
    return ScoredCandidate(
        text=candidate.text,
        token_ids=candidate.token_ids,
        reward=float(reward),
        weight=weight,
        cumulative_logprob=candidate.cumulative_logprob,
        finish_reason=candidate.finish_reason,
    )
