"""Early pruning of one per-response selection, online and as an offline replay.

Online, each of the n candidates is its own engine request (seeded as in unpruned decoding),
its tokens reported as they decode. At every checkpoint the live candidates' partial
responses are scored (rank) or bounded (bound), the pruned ones are cancelled, which aborts
their engine requests, and the survivors run on; the final draw is softmax(r / lambda) over
the survivors' full rewards. :func:`replay` applies the same decisions to finished candidates.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from common.prompts import Prompt
from common.tasks import first_error
from engine.guarded import GuardedScorer
from engine.pruning import Pruner, aligned_checkpoints, checkpoints
from engine.resolve import SettingsError
from engine.seeds import block_seed
from engine.selection import (
    effective_sample_size,
    kl_bon_estimate_from_logprob,
    kl_from_uniform,
    select,
)
from engine.types import (
    BlockRecord,
    Candidate,
    PrefillTokens,
    PruneReport,
    SamplingSettings,
    SBoNParams,
    ScoredCandidate,
)
from reward.base import BlockQuery

OutputCallback = Callable[[Sequence[int], PrefillTokens], None]


@runtime_checkable
class PrunableBackend(Protocol):
    """What online pruning needs of an engine: single samples it can stop, and detokenising."""

    kv_block_tokens: int | None  # tokens per prefix-cache block (None: the engine's default)

    async def sample_one(self, prompt_token_ids: Sequence[int], sampling: SamplingSettings,
                         max_tokens: int, request_id: str, seed: int | None, *,
                         on_output: OutputCallback,
                         prefilled: asyncio.Event | None = None) -> Candidate:
        """One sample (seeded like sample i of ``generate``); cancelling it aborts it."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of some token ids."""
        ...


def check_prune(params: SBoNParams, scorer: GuardedScorer) -> None:
    """Refuse pruning the chosen reward cannot support (a 400 naming ``prune.mode``)."""
    if params.prune is not None and params.prune.mode == "bound" and not scorer.has_bounds:
        raise SettingsError(f"prune mode 'bound' needs a reward that declares bounds; "
                            f"'{scorer.name}' does not (use mode 'rank')", "prune.mode")


def check_checkpoints(params: SBoNParams, max_tokens: int, max_checkpoints: int) -> None:
    """Refuse more checkpoints (reward calls) than the server allows (``prune.every``)."""
    if params.prune is None:
        return
    count = len(checkpoints(params.prune.every, max_tokens))
    if count > max_checkpoints:
        raise SettingsError(f"{max_tokens} tokens with a checkpoint every "
                            f"{params.prune.every} make {count} checkpoints; the maximum is "
                            f"{max_checkpoints}", "prune.every")


def checkpoint_block(scorer: GuardedScorer, block: int | None) -> int | None:
    """The KV block size checkpoints align to: only for a reward whose queries go through a
    vLLM prefix cache (judge, ``vllm``); for others alignment would only delay them."""
    return block if scorer.reuses_prefix_cache else None


def prunes(params: SBoNParams) -> bool:
    """Whether a request prunes: per-response mode, scored, more than one candidate."""
    return params.prune is not None and not params.blockwise and params.score and params.n > 1


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of candidate ``index``: what ``generate`` gives its samples (seed + index)."""
    return None if seed is None else seed + index


@dataclass(frozen=True)
class View:
    """A candidate as a checkpoint sees it: its first tokens, or all of it once finished."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool


def view_at(token_ids: Sequence[int], final: Candidate | None, checkpoint: int,
            decode: Callable[[Sequence[int]], str]) -> View:
    """The candidate at ``checkpoint`` tokens: finished when it ended within them."""
    if final is not None and final.num_tokens <= checkpoint:
        return View(final.token_ids, final.text, True)
    ids = tuple(token_ids[:checkpoint])
    return View(ids, decode(ids), False)


@dataclass
class Accounting:
    """Reward work of one pruned selection: checkpoints and the final scoring together."""

    scoring: PrefillTokens = field(default_factory=PrefillTokens)
    tokens_scored: int = 0
    scoring_s: float = 0.0


@dataclass
class Checkpointer:
    """Scores or bounds a checkpoint's views and asks the :class:`Pruner` what to stop."""

    pruner: Pruner
    scorer: GuardedScorer
    prompt: Prompt
    prompt_ids: Sequence[int]
    exact: dict[int, float] = field(default_factory=dict)  # full rewards known so far
    accounting: Accounting = field(default_factory=Accounting)
    block: int | None = None  # the engine's KV block size: checkpoints land on its boundaries

    def positions(self, max_tokens: int) -> list[int]:
        """The checkpoints of this request (the online loop and the replay use the same)."""
        return aligned_checkpoints(self.pruner.settings.every, max_tokens,
                                   len(self.prompt_ids), self.block)

    async def score(self, views: dict[int, View]) -> dict[int, float]:
        """Rewards of ``views`` (one reward call); finished ones are kept as exact."""
        if not views:
            return {}
        order = sorted(views)
        started = time.perf_counter()
        scores = await self.scorer.score_some(BlockQuery(
            prompt=self.prompt, prompt_ids=self.prompt_ids, prefix_text="", prefix_ids=[],
            block_texts=[views[i].text for i in order],
            block_ids=[views[i].token_ids for i in order]))
        acct = self.accounting
        acct.scoring_s += time.perf_counter() - started
        acct.scoring += PrefillTokens(scores.computed_tokens, scores.cached_tokens)
        acct.tokens_scored += sum(len(views[i].token_ids) for i in order)
        rewards = dict(zip(order, scores.rewards, strict=True))
        self.exact.update({i: r for i, r in rewards.items() if views[i].finished})
        return rewards

    async def step(self, checkpoint: int, views: dict[int, View]) -> list[int]:
        """The candidates pruned at ``checkpoint``, given every live candidate's view."""
        running = {i for i, v in views.items() if not v.finished}
        finished = {i: v for i, v in views.items() if v.finished and i not in self.exact}
        if self.pruner.settings.mode == "rank":
            partial = await self.score({i: v for i, v in views.items()
                                        if not v.finished or i in finished})
            partial.update({i: self.exact[i] for i in views if i in self.exact})
            return self.pruner.rank_step(checkpoint, partial, running)
        await self.score(finished)
        order = sorted(running)
        started = time.perf_counter()
        bounds = await self.scorer.reward_bounds([self.prompt] * len(order),
                                                 [views[i].text for i in order])
        self.accounting.scoring_s += time.perf_counter() - started
        return self.pruner.bound_step(
            checkpoint, {i: (b.lower, b.upper) for i, b in zip(order, bounds, strict=True)},
            {i: self.exact[i] for i in views if views[i].finished}, running)

    async def final_rewards(self, candidates: dict[int, Candidate]) -> dict[int, float]:
        """Full rewards of the survivors: exact ones reused, the rest scored in one call;
        -inf for all of them is the reward's failure, as for any selection."""
        missing = {i: View(c.token_ids, c.text, True) for i, c in candidates.items()
                   if i not in self.exact}
        await self.score(missing)
        order = sorted(candidates)
        checked = self.scorer.check([self.exact[i] for i in order], len(order))
        return dict(zip(order, checked, strict=True))


@dataclass
class _Sample:
    token_ids: list[int] = field(default_factory=list)
    prefill: PrefillTokens = field(default_factory=PrefillTokens)
    final: Candidate | None = None
    task: asyncio.Task[None] | None = None


class PrunedSelection:
    """One per-response selection with early pruning, run online over a prunable backend."""

    def __init__(self, backend: PrunableBackend, checkpointer: Checkpointer,
                 sampling: SamplingSettings, request_id: str) -> None:
        self.backend = backend
        self.check = checkpointer
        self.sampling = sampling
        self.request_id = request_id
        self.samples = [_Sample() for _ in range(checkpointer.pruner.n)]
        self._changed = asyncio.Event()
        self._prefilled = asyncio.Event()

    async def run(self) -> list[Candidate]:
        """Every candidate: survivors whole, pruned ones up to where they were stopped."""
        try:
            async with asyncio.TaskGroup() as group:
                for i, sample in enumerate(self.samples):
                    sample.task = group.create_task(self._sample(i))
                await self._checkpoints()
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        return [self._candidate(s) for s in self.samples]

    async def _sample(self, index: int) -> None:
        sample = self.samples[index]

        def on_output(ids: Sequence[int], prefill: PrefillTokens) -> None:
            sample.token_ids.extend(ids)
            sample.prefill = prefill
            self._prefilled.set()
            self._changed.set()

        if index > 0:
            # The first sample prefills the prompt alone; the others then find its KV
            # blocks in the prefix cache (as ``generate`` does).
            await self._prefilled.wait()
        try:
            sample.final = await self.backend.sample_one(
                self.check.prompt_ids, self.sampling, self.sampling.max_tokens,
                f"{self.request_id}-{index}",
                sample_seed(block_seed(self.sampling.seed, 0), index), on_output=on_output,
                prefilled=self._prefilled if index == 0 else None)
        finally:
            self._prefilled.set()  # never leave the other samples waiting
            self._changed.set()

    async def _checkpoints(self) -> None:
        pruner = self.check.pruner
        for checkpoint in self.check.positions(self.sampling.max_tokens):
            live = sorted(pruner.live)
            if len(live) <= pruner.settings.min_keep:
                return
            while not all(self._reached(i, checkpoint) for i in live):
                self._changed.clear()
                await self._changed.wait()
            views = {i: view_at(self.samples[i].token_ids, self.samples[i].final, checkpoint,
                                self.backend.decode) for i in live}
            if all(v.finished for v in views.values()):
                return
            for i in await self.check.step(checkpoint, views):
                task = self.samples[i].task
                if task is not None:
                    task.cancel()  # aborts its engine request at once

    def _reached(self, index: int, checkpoint: int) -> bool:
        sample = self.samples[index]
        # One token past the checkpoint: the engine has then computed the KV of all of the
        # first ``checkpoint`` tokens, so the reward query finds their last block cached.
        return sample.final is not None or len(sample.token_ids) > checkpoint

    def _candidate(self, sample: _Sample) -> Candidate:
        if sample.final is not None:
            return sample.final
        ids = tuple(sample.token_ids)
        return Candidate(ids, self.backend.decode(ids), None, None, None, sample.prefill)


async def replay(checkpointer: Checkpointer, candidates: Sequence[Candidate], max_tokens: int,
                 decode: Callable[[Sequence[int]], str]) -> Pruner:
    """The decisions online pruning takes, applied to candidates generated to the end."""
    pruner = checkpointer.pruner
    for checkpoint in checkpointer.positions(max_tokens):
        live = sorted(pruner.live)
        if len(live) <= pruner.settings.min_keep:
            break
        views = {i: view_at(candidates[i].token_ids, candidates[i], checkpoint, decode)
                 for i in live}
        if all(v.finished for v in views.values()):
            break
        await checkpointer.step(checkpoint, views)
    return pruner


def report(pruner: Pruner) -> PruneReport:
    """The ``prune`` part of a response."""
    settings = pruner.settings
    return PruneReport(mode=settings.mode, every=settings.every,
                       pruned_at=list(pruner.pruned_at),
                       checkpoints=pruner.scored_checkpoints,
                       distortion_bound=pruner.spent if settings.mode == "bound" else None)


@dataclass(frozen=True)
class PrunedStep:
    """A pruned selection's record, report and reward accounting."""

    record: BlockRecord
    report: PruneReport
    tokens_scored: int


async def pruned_step(backend: PrunableBackend, scorer: GuardedScorer, prompt: Prompt,
                      prompt_ids: Sequence[int], params: SBoNParams,
                      sampling: SamplingSettings, request_id: str,
                      rng: random.Random, block: int | None = None) -> PrunedStep:
    """Run one pruned per-response selection and record it as the request's only block."""
    check_prune(params, scorer)
    if params.prune is None:
        raise ValueError("pruned_step needs prune settings")
    pruner = Pruner(params.prune, params.n, params.lam)
    checkpointer = Checkpointer(pruner, scorer, prompt, prompt_ids,
                                block=checkpoint_block(scorer, block))
    started = time.perf_counter()
    candidates = await PrunedSelection(backend, checkpointer, sampling, request_id).run()
    survivors = {i: c for i, c in enumerate(candidates) if pruner.pruned_at[i] is None}
    rewards = await checkpointer.final_rewards(survivors)
    generated = time.perf_counter()
    order = sorted(survivors)
    selection = select([rewards[i] for i in order], params.lam, rng, params.normalize,
                       kl_budget=params.kl_budget)
    # Pruned candidates have weight 0 among all n: the diagnostics count pruning as
    # distortion, as it is (docs/maths.md, pruning).
    by_index = dict(zip(order, selection.weights, strict=True))
    weights = [by_index.get(i, 0.0) for i in range(len(candidates))]
    chosen = order[selection.chosen_index]
    scored = [ScoredCandidate(c.text, c.token_ids, rewards.get(i, -math.inf), weights[i],
                              c.cumulative_logprob, c.finish_reason, c.stop_reason)
              for i, c in enumerate(candidates)]
    scoring_s = checkpointer.accounting.scoring_s
    record = BlockRecord(
        index=0, candidates=scored, chosen_index=chosen, ess=effective_sample_size(weights),
        kl_from_uniform=kl_from_uniform(weights),
        kl_estimate=kl_bon_estimate_from_logprob(params.n, candidates[chosen].cumulative_logprob),
        lam=selection.lam, generation_s=max(0.0, generated - started - scoring_s),
        scoring_s=scoring_s, selection_s=time.perf_counter() - generated,
        prefill_generation=sum((c.prefill for c in candidates), PrefillTokens()),
        prefill_scoring=checkpointer.accounting.scoring)
    return PrunedStep(record, report(pruner), checkpointer.accounting.tokens_scored)
