"""The transformers reward backends on a CUDA device, against the same models on the CPU.

Skipped where torch sees no GPU (the default test machines); `scripts/gpu-check.sh` runs the
integration tier on a GPU machine, where these run. The models are tiny and built from a
config, so the test needs no download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_prm, build_tiny_reward_model

from common.config import HFRewardConfig, PRMRewardConfig
from reward.hf import HFRewardScorer
from reward.prm import PRMScorer


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")

PROMPTS = ["write a haiku about the sea"] * 4 + ["please write about the rocks"] * 2
RESPONSES = ["the sea is blue", "waves crash on rocks and the sea is calm", "blue", "a haiku",
             "the rocks", "calm rocks and blue waves crash"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm-cuda"))


async def _scores(model: Path, device: str, **extra: object) -> list[float]:
    scorer = HFRewardScorer(HFRewardConfig.model_validate(
        {"name": "rm", "type": "hf", "model": str(model), "device": device, **extra}))
    await scorer.start()
    try:
        return await scorer.score(PROMPTS, RESPONSES)
    finally:
        await scorer.close()


@needs_cuda
async def test_hf_reward_on_cuda_equals_the_cpu(tiny_model: Path) -> None:
    on_cpu = await _scores(tiny_model, "cpu")
    on_gpu = await _scores(tiny_model, "cuda")
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)
    assert len({round(v, 4) for v in on_gpu}) > 1  # the model tells the responses apart


@needs_cuda
async def test_shared_prompt_kv_on_cuda_equals_full_recomputation(tiny_model: Path) -> None:
    shared = await _scores(tiny_model, "cuda", max_batch_tokens=64)
    full = await _scores(tiny_model, "cuda", max_batch_tokens=64, share_prompt_kv=False)
    assert shared == pytest.approx(full, abs=1e-3)


@needs_cuda
async def test_bfloat16_on_cuda_stays_close_to_float32(tiny_model: Path) -> None:
    wide = await _scores(tiny_model, "cuda")
    narrow = await _scores(tiny_model, "cuda", dtype="bfloat16")
    spread = max(wide) - min(wide)
    assert max(abs(a - b) for a, b in zip(wide, narrow, strict=True)) <= 0.1 * spread + 0.02


@needs_cuda
async def test_prm_on_cuda_equals_the_cpu(tmp_path: Path) -> None:
    model = build_tiny_prm(tmp_path / "prm")
    steps = ["one so two\nthree = so", "two = one\nso three", "so\none"]
    prompts = ["one two three"] * len(steps)
    results = []
    for device in ("cpu", "cuda"):
        scorer = PRMScorer(PRMRewardConfig(name="prm", type="prm", model=str(model),
                                           device=device, step_delimiter="\n"))
        await scorer.start()
        try:
            results.append(await scorer.score(prompts, steps))
        finally:
            await scorer.close()
    assert results[1] == pytest.approx(results[0], abs=1e-3)
