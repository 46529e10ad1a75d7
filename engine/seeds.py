"""Per-block seeds that keep a seeded blockwise request reproducible and its blocks distinct."""

from __future__ import annotations

# The engine gives the n samples of one request the seeds seed + 0 .. seed + n - 1, so the
# seeds of consecutive blocks are spaced far enough apart never to overlap.
BLOCK_SEED_STRIDE = 1_000_003
SEED_MODULUS = 2**63 - 1


def block_seed(seed: int | None, block_index: int) -> int | None:
    """The engine seed for block ``block_index`` of a request seeded with ``seed``."""
    if seed is None:
        return None
    return (seed + block_index * BLOCK_SEED_STRIDE) % SEED_MODULUS


# Measurements give every prompt and every stream of draws (a method, or the pool against
# independent draws) seeds of its own; the sample seeds s .. s + n - 1 of one request must
# not overlap another stream's.
PROMPT_SEED_STRIDE = 1_009
STREAM_SEED_STRIDE = 100_000_007


def run_seed(base: int, prompt_index: int, stream: int = 0) -> int:
    """The seed of one measured request: distinct per prompt and per stream."""
    return (base + prompt_index * PROMPT_SEED_STRIDE + stream * STREAM_SEED_STRIDE) % SEED_MODULUS
