"""Typed contracts between the layers: candidates, request settings and SBoN results.

The generation backend returns :class:`Candidate` objects, the soft best-of-n loop turns
them into :class:`BlockRecord` and :class:`SBoNResult`. Both the HTTP layer and the CLI
read these dataclasses; no dicts cross a layer boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.config import Normalization
from common.prune import PruneSettings


@dataclass(frozen=True)
class PrefillTokens:
    """Prompt tokens of engine requests: computed by a forward pass, or served from the
    prefix cache. Adds up over requests."""

    computed: int = 0
    cached: int = 0

    def __add__(self, other: PrefillTokens) -> PrefillTokens:
        return PrefillTokens(self.computed + other.computed, self.cached + other.cached)

    @property
    def total(self) -> int:
        return self.computed + self.cached


@dataclass(frozen=True)
class Candidate:
    """One sampled continuation as the engine produced it."""

    token_ids: tuple[int, ...]
    text: str
    cumulative_logprob: float | None
    finish_reason: str | None  # "stop", "length" or None while unfinished
    stop_reason: str | int | None = None  # the stop string or token that ended it
    prefill: PrefillTokens = PrefillTokens()  # of the engine request that sampled it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SamplingSettings:
    """The usual sampling parameters, passed through to the engine unchanged."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # A block boundary: generation of one block stops after this string, which is kept
    # (the loop's step-aligned blocks; never set by a client directly).
    block_delimiter: str | None = None


@dataclass(frozen=True)
class SBoNParams:
    """The soft best-of-n policy for one request."""

    n: int = 4
    lam: float = 1.0  # 0 = hard best-of-n, math.inf = base model
    block_size: int | None = None  # None = one selection per whole response
    normalize: Normalization = Normalization.RAW
    reward: str | None = None  # a configured reward's name; None = the default one
    score: bool = True  # False: plain decoding (n = 1), no reward call
    kl_budget: float | None = None  # nats per selection; when set, lambda is solved per block
    block_delimiter: str | None = None  # a block also ends after this string (a step)
    max_blocks: int | None = None  # selections at most (step-aligned blocks can be short)
    particles: bool = False  # blockwise: keep n weighted particles (engine/particles.py)
    ess_threshold: float = 0.5  # particles: resample when ESS < ess_threshold * n
    prune: PruneSettings | None = None  # early pruning (per-response mode only)

    @property
    def blockwise(self) -> bool:
        return self.block_size is not None


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate with its reward and selection weight within its block."""

    text: str
    token_ids: tuple[int, ...]
    reward: float
    weight: float
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class ParticleStep:
    """What the particles did after one block (engine/particles.py)."""

    ess: float  # (sum W)^2 / sum W^2 of the weights after the block, before resampling
    resampled: bool
    ancestors: list[int] | None = None  # per new particle, the particle it copies
    live: int = 0  # particles still decoding during this block


@dataclass(frozen=True)
class BlockRecord:
    """One selection step: the candidates of a block and which one was appended."""

    index: int
    candidates: list[ScoredCandidate]
    chosen_index: int
    ess: float
    kl_from_uniform: float
    kl_estimate: float
    lam: float = math.nan  # the lambda this selection used (solved when a KL budget is set)
    generation_s: float = 0.0
    scoring_s: float = 0.0
    selection_s: float = 0.0
    prefill_generation: PrefillTokens = PrefillTokens()
    prefill_scoring: PrefillTokens = PrefillTokens()
    particles: ParticleStep | None = None  # particles mode only
    reward_truncated: bool = False  # the reward read the responses but not the whole prompt

    @property
    def chosen(self) -> ScoredCandidate:
        return self.candidates[self.chosen_index]

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.candidates]

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.candidates]


@dataclass(frozen=True)
class Diagnostics:
    """Distortion and win-rate figures for one response (sums over blocks where additive)."""

    ess: float  # of the final selection (mean over blocks in blockwise mode)
    kl_from_uniform: float  # summed over blocks (chain rule)
    kl_bon_bound: float  # log n - (n-1)/n, per selection, summed over blocks
    kl_estimate: float  # D(eps) of Beirami et al., summed over blocks
    win_rate_bound: float  # n / (n + 1)


@dataclass(frozen=True)
class PruneReport:
    """What early pruning did to one selection (engine/pruning.py)."""

    mode: str
    every: int
    pruned_at: list[int | None]  # per candidate: the checkpoint (tokens) it was pruned at
    checkpoints: int  # checkpoints that were scored
    distortion_bound: float | None = None  # bound mode: sum of the pruned weight bounds

    @property
    def pruned(self) -> int:
        return sum(1 for at in self.pruned_at if at is not None)


@dataclass
class SBoNResult:
    """The outcome of one soft best-of-n request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    params: SBoNParams
    reward_name: str
    blocks: list[BlockRecord]
    diagnostics: Diagnostics
    prompt_tokens: int
    tokens_generated: int  # across all candidates of all blocks
    tokens_scored: int  # response tokens passed to the reward model
    timings: dict[str, float] = field(default_factory=dict)
    # Prompt tokens of every engine request: generation, and scoring (model rewards).
    prefill_generation: PrefillTokens = PrefillTokens()
    prefill_scoring: PrefillTokens = PrefillTokens()
    pruning: PruneReport | None = None

    @property
    def tokens_computed(self) -> int:
        """The cost axis: tokens decoded for every candidate (pruned ones up to where they
        stopped) plus prompt tokens computed, not cached, by generation and by scoring.
        hf and prm report the tokens their model runs on (reward/cost.py); python none."""
        return (self.tokens_generated + self.prefill_generation.computed
                + self.prefill_scoring.computed)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def reward_truncated(self) -> bool:
        """Whether any selection's reward read the responses but not the whole prompt."""
        return any(b.reward_truncated for b in self.blocks)

    @property
    def final_block(self) -> BlockRecord:
        return self.blocks[-1]

    @property
    def chosen_index(self) -> int:
        return self.final_block.chosen_index


@dataclass(frozen=True)
class BlockEvent:
    """Streamed while a request runs: the text appended by one chosen block."""

    block: BlockRecord
    text_delta: str
    finished: bool


@dataclass(frozen=True)
class TextEvent:
    """Streamed during plain decoding (one candidate, no selection): text as it decodes."""

    text_delta: str
