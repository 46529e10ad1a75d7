"""Per-block seeds that keep a seeded blockwise request reproducible and its blocks distinct."""

from __future__ import annotations

import hashlib

# The engine gives the n samples of one request the seeds seed + 0 .. seed + n - 1, so the
# seeds of consecutive blocks are spaced far enough apart never to overlap.
BLOCK_SEED_STRIDE = 1_000_003
SEED_MODULUS = 2**63 - 1


def block_seed(seed: int | None, block_index: int) -> int | None:
    """The engine seed for block ``block_index`` of a request seeded with ``seed``."""
    if seed is None:
        return None
    return (seed + block_index * BLOCK_SEED_STRIDE) % SEED_MODULUS


def choice_seed(seed: int | None, choice_index: int) -> int | None:
    """The seed of returned choice ``choice_index`` (OpenAI ``n``) of a seeded request.

    Choice 0 keeps the request's seed, so ``n = 1`` and the first of several choices agree;
    the others get seeds mixed from (seed, index), far from the block seeds of choice 0.
    """
    if seed is None or choice_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{choice_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


# Measurements give every prompt and every stream of draws (a method, or the pool against
# independent draws) seeds of its own; the sample seeds s .. s + n - 1 of one request must
# not overlap another stream's.
PROMPT_SEED_STRIDE = 1_009
STREAM_SEED_STRIDE = 100_000_007


def run_seed(base: int, prompt_index: int, stream: int = 0) -> int:
    """The seed of one measured request: distinct per prompt and per stream."""
    return (base + prompt_index * PROMPT_SEED_STRIDE + stream * STREAM_SEED_STRIDE) % SEED_MODULUS
