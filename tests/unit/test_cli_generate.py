"""``sbon generate`` over a fake runtime: its flags resolve like a request's ``sbon`` object.

The command's own resolution path runs (argument parsing, ``resolve_params``, the loop);
only the engine start is replaced by a fake runtime whose scorer counts its calls.
"""

from __future__ import annotations

import pytest
from fakes import FakeBackend, FakeRuntime, FakeScorer, fake_runtime

import engine.runtime
from cli.main import _generate_async, build_parser
from common.config import AppConfig
from engine.types import SBoNResult


def use_fake_runtime(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeRuntime, FakeScorer]:
    scorer = FakeScorer(name="judge")
    runtime = fake_runtime(FakeBackend(), {"judge": scorer})

    async def start(config: AppConfig) -> FakeRuntime:
        return runtime

    monkeypatch.setattr(engine.runtime, "start_runtime", start)
    return runtime, scorer


async def generate(*flags: str) -> SBoNResult:
    args = build_parser().parse_args(["generate", "Tell me about the sea.", "--max-tokens", "4",
                                      "--seed", "3", *flags])
    result = await _generate_async(AppConfig(), args)
    assert isinstance(result, SBoNResult)
    return result


@pytest.mark.parametrize("flags", [(), ("--block-size", "2"), ("--lam", "0")],
                         ids=["per-response", "blockwise", "hard"])
async def test_generate_with_one_candidate_pays_no_reward_call(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...],
) -> None:
    runtime, scorer = use_fake_runtime(monkeypatch)
    result = await generate("--n", "1", *flags)
    assert result.params.n == 1 and result.params.score is False
    assert scorer.seen == [] and result.tokens_scored == 0
    assert all(call.n == 1 for call in runtime.backend.calls)
    assert len(result.token_ids) == 4 and runtime.closed


async def test_generate_with_several_candidates_scores_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, scorer = use_fake_runtime(monkeypatch)
    result = await generate("--n", "3", "--lam", "0.5")
    assert result.params.score is True and result.params.lam == 0.5
    assert len(scorer.seen) == 3 and runtime.backend.calls[0].n == 3


async def test_generate_without_flags_uses_the_configured_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, scorer = use_fake_runtime(monkeypatch)
    result = await generate()
    defaults = AppConfig().sbon
    assert (result.params.n, result.params.lam, result.params.block_size) == (
        defaults.n, defaults.lam, defaults.block_size)
    assert len(scorer.seen) == defaults.n


async def test_generate_refuses_a_non_positive_candidate_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, _ = use_fake_runtime(monkeypatch)
    with pytest.raises(ValueError, match="positive"):
        await generate("--n", "0")
    assert runtime.backend.calls == []


async def test_generate_with_particles_reports_resampling_per_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.report import render_text, result_to_dict

    use_fake_runtime(monkeypatch)
    result = await generate("--n", "4", "--block-size", "2", "--particles",
                            "--ess-threshold", "1.0", "--lam", "0.5")
    assert result.params.particles and result.params.ess_threshold == 1.0
    blocks = result_to_dict(result)["blocks"]
    assert len(blocks) == 2 and all("resampled" in b and "ancestors" in b for b in blocks)
    # Threshold 1: any unequal weights after the first block trigger resampling.
    assert blocks[0]["resampled"] == (blocks[0]["ess"] < 4 - 1e-9)
    assert "particles: ESS per block" in render_text(result)
    with pytest.raises(ValueError, match="blockwise"):
        await generate("--n", "4", "--particles")
