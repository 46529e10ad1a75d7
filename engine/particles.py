"""Particles in blockwise mode (``sbon.particles``): n weighted partial responses kept alive.

Each block extends every live particle, multiplies its weight by exp((r_t - r_{t-1}) / lambda),
resamples systematically when ESS < ess_threshold x n, and finally draws one by its weight:
the target p(y) exp(r(y) / lambda) (arXiv 2404.17546, 2502.01618; docs/maths.md, "Particles").
Copies of one ancestor continue from its token ids in one engine request (its KV is cached).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from common.tasks import first_error
from engine.backend import GenerationBackend
from engine.blocks import RequestInputs, end_of_block
from engine.particle_math import (
    add_increment,
    ess,
    needs_resampling,
    particle_weights,
    systematic_resample,
)
from engine.seeds import block_seed
from engine.selection import (
    kl_bon_bound,
    kl_bon_estimate_from_logprob,
    kl_from_uniform,
    sample_index,
    win_rate_bound,
)
from engine.types import (
    BlockEvent,
    BlockRecord,
    Candidate,
    Diagnostics,
    ParticleStep,
    PrefillTokens,
    SBoNResult,
    ScoredCandidate,
)
from reward.base import BlockQuery, score_block


@dataclass
class _Particle:
    """One partial response with its weight's numerator and the slots of its ancestors."""

    response_ids: list[int] = field(default_factory=list)
    text: str = ""
    reward: float = 0.0  # r_t of the response so far (r_0 = 0); the full reward once finished
    accumulated: float = 0.0  # A_k: reward increments since the last resampling
    finish_reason: str | None = None
    path: list[int] = field(default_factory=list)  # its slot in every block so far

    def copy(self) -> _Particle:
        """A copy with equal weight (resampling resets the weights)."""
        return _Particle(list(self.response_ids), self.text, self.reward, 0.0,
                         self.finish_reason, list(self.path))


class ParticleFilter:
    """Runs one choice of a particles request; :meth:`stream` yields its blocks and result."""

    def __init__(self, backend: GenerationBackend, request: RequestInputs) -> None:
        self.backend, self.request = backend, request
        self.particles = [_Particle() for _ in range(request.params.n)]
        self.records: list[BlockRecord] = []
        self.weights = [1.0 / request.params.n] * request.params.n
        self.tokens_generated = 0
        self.tokens_scored = 0

    async def stream(self) -> AsyncIterator[BlockEvent | SBoNResult]:
        """Run every block, then draw; the text is known only then, so the block events
        (one per block, the drawn particle's text) all come at the end."""
        while any(p.finish_reason is None for p in self.particles):
            await self._block()
        chosen = self.particles[sample_index(self.weights, self.request.rng)]
        last = len(self.records) - 1
        self.records = [self._drawn(record, slot, selects=number == last or bool(
            record.particles and record.particles.resampled))
            for number, (record, slot) in enumerate(zip(self.records, chosen.path,
                                                        strict=True))]
        released = 0
        for number, record in enumerate(self.records):
            end = len(chosen.text) if number == last else min(
                len(chosen.text), released + len(record.chosen.text))
            yield BlockEvent(block=record, text_delta=chosen.text[released:end],
                             finished=number == last)
            released = end
        yield self._result(chosen)

    def _drawn(self, record: BlockRecord, slot: int, selects: bool) -> BlockRecord:
        """A block's record once the drawn particle's lineage is known: its slot is the
        chosen one. Only a resampling or the final draw selects, so only they count KL."""
        if not selects:
            return replace(record, chosen_index=slot, kl_from_uniform=0.0, kl_estimate=0.0)
        estimate = kl_bon_estimate_from_logprob(
            self.request.params.n, record.candidates[slot].cumulative_logprob)
        return replace(record, chosen_index=slot, kl_estimate=estimate)

    async def _block(self) -> None:
        started = time.perf_counter()
        live = [k for k, p in enumerate(self.particles) if p.finish_reason is None]
        blocks = await self._generate(live)
        generated = time.perf_counter()
        for k in live:
            self._extend(self.particles[k], blocks[k])
        rewards, scoring = await self._score(live)
        scored = time.perf_counter()
        for k, reward in zip(live, rewards, strict=True):
            particle = self.particles[k]
            particle.accumulated = add_increment(particle.accumulated, particle.reward, reward)
            particle.reward = reward
        self.weights = particle_weights([p.accumulated for p in self.particles],
                                        self.request.params.lam)
        candidates = [_slot(p, blocks.get(k), w)
                      for k, (p, w) in enumerate(zip(self.particles, self.weights, strict=True))]
        for slot, particle in enumerate(self.particles):
            particle.path.append(slot)
        kl = kl_from_uniform(self.weights)
        step = self._resample(len(live))
        self.records.append(BlockRecord(
            index=len(self.records), candidates=candidates, chosen_index=0, ess=step.ess,
            kl_from_uniform=kl, kl_estimate=0.0, lam=self.request.params.lam,
            generation_s=generated - started, scoring_s=scored - generated,
            selection_s=time.perf_counter() - scored,
            prefill_generation=sum((c.prefill for c in blocks.values()), PrefillTokens()),
            prefill_scoring=scoring, particles=step))

    async def _generate(self, live: list[int]) -> dict[int, Candidate]:
        """One engine request per distinct prefix: copies of one ancestor share its KV."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for k in live:
            groups.setdefault(tuple(self.particles[k].response_ids), []).append(k)
        request, index = self.request, len(self.records)
        sampling = request.sampling
        if request.params.block_delimiter:
            sampling = replace(sampling, block_delimiter=request.params.block_delimiter)
        seed = block_seed(sampling.seed, index)
        tasks: list[tuple[list[int], asyncio.Task[list[Candidate]]]] = []
        offset = 0
        try:
            async with asyncio.TaskGroup() as group:
                for number, (prefix, members) in enumerate(groups.items()):
                    remaining = sampling.max_tokens - len(prefix)
                    size = min(request.params.block_size or remaining, remaining)
                    # Disjoint sample seeds: the engine seeds sample i of a request seed + i.
                    tasks.append((members, group.create_task(self.backend.generate(
                        request.prompt_ids + list(prefix), len(members), sampling, size,
                        f"{request.request_id}-b{index}-g{number}",
                        None if seed is None else seed + offset))))
                    offset += len(members)
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        out: dict[int, Candidate] = {}
        for members, task in tasks:
            out.update(zip(members, task.result(), strict=True))
        self.tokens_generated += sum(c.num_tokens for c in out.values())
        return out

    def _extend(self, particle: _Particle, block: Candidate) -> None:
        """Append a block, cut at a stop string that spans blocks, and decide whether the
        particle has finished (the same rules as the blockwise loop, engine/sbon.py)."""
        before = len(particle.text)
        particle.response_ids.extend(block.token_ids)
        particle.text, particle.finish_reason = end_of_block(
            self.request, particle.text + block.text, before, block,
            response_tokens=len(particle.response_ids), blocks_done=len(self.records) + 1,
            max_model_len=self.backend.max_model_len)

    async def _score(self, live: list[int]) -> tuple[list[float], PrefillTokens]:
        """Rewards of the live particles' whole responses so far, in one scoring call (the
        token ids let a model reward reuse the KV the engine cached for them)."""
        request = self.request
        if not request.params.score:
            return [0.0] * len(live), PrefillTokens()
        chosen = [self.particles[k] for k in live]
        scores = await score_block(request.scorer, BlockQuery(
            prompt=request.prompt, prompt_ids=request.prompt_ids, prefix_text="",
            prefix_ids=[], block_texts=[p.text for p in chosen],
            block_ids=[p.response_ids for p in chosen]))
        self.tokens_scored += sum(len(p.response_ids) for p in chosen)
        return scores.rewards, PrefillTokens(scores.computed_tokens, scores.cached_tokens)

    def _resample(self, live: int) -> ParticleStep:
        """Resample when the ESS is low and some particle still decodes; weights reset."""
        before = ess(self.weights)
        still_live = any(p.finish_reason is None for p in self.particles)
        if not still_live or not needs_resampling(self.weights,
                                                  self.request.params.ess_threshold):
            return ParticleStep(ess=before, resampled=False, live=live)
        ancestors = systematic_resample(self.weights, self.request.rng.random())
        self.particles = [self.particles[a].copy() for a in ancestors]
        self.weights = [1.0 / len(ancestors)] * len(ancestors)
        return ParticleStep(ess=before, resampled=True, ancestors=ancestors, live=live)

    def _result(self, chosen: _Particle) -> SBoNResult:
        params, records = self.request.params, self.records
        selecting = [r for n, r in enumerate(records) if n == len(records) - 1
                     or (r.particles is not None and r.particles.resampled)]
        diagnostics = Diagnostics(
            ess=ess(self.weights),
            kl_from_uniform=sum(r.kl_from_uniform for r in selecting),
            kl_bon_bound=kl_bon_bound(params.n) * len(selecting),
            kl_estimate=sum(r.kl_estimate for r in selecting),
            win_rate_bound=win_rate_bound(params.n),
        )
        return SBoNResult(
            text=chosen.text, token_ids=list(chosen.response_ids),
            finish_reason=chosen.finish_reason or "length", params=params,
            reward_name=self.request.reward_name, blocks=list(records), diagnostics=diagnostics,
            prompt_tokens=len(self.request.prompt_ids), tokens_generated=self.tokens_generated,
            tokens_scored=self.tokens_scored,
            timings={"generation": sum(r.generation_s for r in records),
                     "scoring": sum(r.scoring_s for r in records),
                     "selection": sum(r.selection_s for r in records)},
            prefill_generation=sum((r.prefill_generation for r in records), PrefillTokens()),
            prefill_scoring=sum((r.prefill_scoring for r in records), PrefillTokens()))


def _slot(particle: _Particle, block: Candidate | None, weight: float) -> ScoredCandidate:
    """Slot k of a block's record: particle k's new block (an empty one once it has
    finished) with its reward so far, its weight after the block, and its finish reason
    (None while it still decodes)."""
    if block is None:
        return ScoredCandidate(text="", token_ids=(), reward=particle.reward, weight=weight,
                               cumulative_logprob=0.0, finish_reason=particle.finish_reason)
    return ScoredCandidate(text=block.text, token_ids=block.token_ids, reward=particle.reward,
                           weight=weight, cumulative_logprob=block.cumulative_logprob,
                           finish_reason=particle.finish_reason,
                           stop_reason=block.stop_reason)
