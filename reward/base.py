"""The reward scorer contract shared by every backend.

A scorer maps parallel lists of prompts and responses to one float each. A prompt is
either plain text (completions) or a tuple of chat messages (chat completions), so a
reward model with a chat template can format the conversation as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from common.prompts import Prompt


class RewardError(RuntimeError):
    """A reward model could not score (not loaded, failed, or returned bad values)."""


@runtime_checkable
class RewardScorer(Protocol):
    """Scores (prompt, response) pairs; higher is better. Implementations are async-safe."""

    name: str

    @property
    def timeout_s(self) -> float:
        """Seconds one scoring call may take (engine/guarded.py applies it to every call)."""
        ...

    @property
    def never_choose_negative_infinity(self) -> bool:
        """True when -inf is a valid reward meaning "never choose this candidate"; otherwise
        -inf is a failure like NaN (engine/guarded.py)."""
        ...

    @property
    def reuses_prefix_cache(self) -> bool:
        """True when its queries run through a vLLM prefix cache (judge, ``vllm``), so that
        work aligned to KV blocks is reused (engine/pruned.py aligns checkpoints to them)."""
        ...

    @property
    def healthy(self) -> bool:
        """True once started and while it can serve; False when it cannot serve without a
        restart (its engine or worker died, a device error that sticks)."""
        ...

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Return one reward per pair, in order."""
        ...

    async def start(self) -> None:
        """Load weights or warm up; called once before the first request."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


@dataclass(frozen=True)
class BlockQuery:
    """One selection step's candidates, with the token ids that let a model reward reuse
    the KV of everything they share (prompt, earlier blocks) from a prefix cache.

    Token ids are the policy tokenizer's: ``prompt_ids`` end with the chat template's
    generation prompt, ``prefix_ids`` are the chosen blocks so far, ``block_ids[i]`` is
    candidate i's new block. The texts say the same in characters.
    """

    prompt: Prompt
    prompt_ids: Sequence[int]
    prefix_text: str
    prefix_ids: Sequence[int]
    block_texts: Sequence[str]
    block_ids: Sequence[Sequence[int]]

    def responses(self) -> list[str]:
        """Each candidate's whole response so far: prefix + its block."""
        return [self.prefix_text + text for text in self.block_texts]


@dataclass(frozen=True)
class Scores:
    """Rewards of one block's candidates, and the prompt tokens the reward model computed
    and found cached (zero when the backend does not run through a prefix cache)."""

    rewards: list[float]
    computed_tokens: int = 0
    cached_tokens: int = 0
    # The input was longer than the reward model reads: its oldest prompt tokens were
    # dropped, every response kept whole (reward/truncation.py).
    truncated: bool = False


@runtime_checkable
class BlockScorer(Protocol):
    """A scorer that takes a whole block at once with its token ids (prefix-cache aware)."""

    async def score_block(self, query: BlockQuery) -> Scores:
        """Score every candidate of ``query``; rewards in candidate order."""
        ...


@dataclass(frozen=True)
class RewardBounds:
    """Bounds on the final reward of every completion of a partial response:
    ``lower <= r(prompt, partial + any continuation) <= upper`` (docs/maths.md, pruning)."""

    lower: float
    upper: float


@runtime_checkable
class BoundedScorer(Protocol):
    """A reward that can bound the final reward of any completion of a partial response
    (rule rewards are often monotone: once a forbidden letter appears, the check fails)."""

    async def bounds(
        self, prompts: Sequence[Prompt], partial_responses: Sequence[str]
    ) -> list[RewardBounds]:
        """One :class:`RewardBounds` per (prompt, partial response), in order."""
        ...


async def score_block(scorer: RewardScorer, query: BlockQuery) -> Scores:
    """Score one block with ``scorer``: token-aware when it can be, by text otherwise."""
    if isinstance(scorer, BlockScorer):
        return await scorer.score_block(query)
    responses = query.responses()
    return Scores(await scorer.score([query.prompt] * len(responses), responses))


def check_lengths(prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
