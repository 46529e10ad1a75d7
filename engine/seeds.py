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
