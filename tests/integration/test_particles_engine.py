"""Particles on the real engine: a request succeeds, and particles that share an ancestor
continue from its token ids, so the prefix cache serves the ancestor's KV (cached tokens)."""

from __future__ import annotations

import pytest

from common.prompts import Message
from engine.types import SamplingSettings, SBoNParams
from engine.vllm_backend import CPU_KV_BLOCK_SIZE

PROMPT = (Message("system", "You are a helpful assistant who answers in full sentences "
                  "and explains every step of the reasoning with care."),
          Message("user", "Write a haiku about the sea, then explain its imagery."),)


def _full_blocks(tokens: int) -> int:
    return tokens // CPU_KV_BLOCK_SIZE * CPU_KV_BLOCK_SIZE


async def test_particles_resume_from_their_ancestors_cached_kv(runtime) -> None:
    n, size = 4, CPU_KV_BLOCK_SIZE
    # ess_threshold 1: any unequal weights after the first block trigger resampling.
    params = SBoNParams(n=n, lam=0.05, block_size=size, particles=True, ess_threshold=1.0)
    result = await runtime.sbon.run(PROMPT, params, SamplingSettings(max_tokens=2 * size,
                                                                     seed=5), "it-particles")
    assert result.text and result.finish_reason in {"stop", "length"}
    assert tuple(t for b in result.blocks for t in b.chosen.token_ids) == tuple(
        result.token_ids)
    first = result.blocks[0]
    assert first.particles is not None and first.particles.live == n
    if len(result.blocks) < 2 or not first.particles.resampled:
        pytest.skip("no second block after a resampling (ended early or equal rewards)")
    ancestors = first.particles.ancestors or []
    live = [a for a in ancestors if first.candidates[a].finish_reason is None]
    assert len(set(ancestors)) < n  # resampling duplicated some particle
    second = result.blocks[1]
    assert second.particles is not None and second.particles.live == len(live)
    # Each live particle's block-2 request starts from prompt + its ancestor's block 1; the
    # cache holds that (generation and the judge computed it), beyond the prompt's blocks.
    shared = _full_blocks(result.prompt_tokens + size)
    assert shared > _full_blocks(result.prompt_tokens)
    assert second.prefill_generation.cached >= len(live) * shared - CPU_KV_BLOCK_SIZE
    assert second.prefill_generation.computed <= len(live) * 2 * CPU_KV_BLOCK_SIZE
