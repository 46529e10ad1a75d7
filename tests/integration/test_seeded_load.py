"""Regression: seeded requests whose prompts cannot all be prefilled in one engine step.

vLLM's CPU worker crashed the whole engine when it split a seeded request's prefill
("CPU Generator does not use offset"); the backend turns chunked prefill off on the CPU.
Last in the tier on purpose: a regression here takes the shared engine down with it.
"""

from __future__ import annotations

import asyncio

from engine.types import SamplingSettings


async def test_many_seeded_prompts_at_once_keep_the_engine_alive(runtime) -> None:
    backend = runtime.backend
    ids = backend.encode_prompt("Tell a long story about a lighthouse keeper and the sea. " * 3)
    # 8 requests x 16 samples x ~40 prompt tokens: several steps' worth of prefill at once.
    outputs = await asyncio.gather(*(
        backend.generate(ids[: len(ids) - i], 16, SamplingSettings(max_tokens=2, seed=i), 2,
                         f"seeded-load-{i}", i) for i in range(8)))
    assert [len(o) for o in outputs] == [16] * 8
    assert backend.ready
