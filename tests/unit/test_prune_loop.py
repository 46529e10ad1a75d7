"""Early pruning in the loop (engine/pruned.py) over the fakes, its settings and resolver."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from fakes import FakeBackend, FakeScorer
from pydantic import ValidationError

from common.config import Normalization, SBoNDefaults
from common.prompts import Prompt
from common.prune import PruneSettings
from engine.guarded import guard
from engine.pruned import Checkpointer, checkpoint_block, replay, sample_seed
from engine.pruning import Pruner, pruned_mass
from engine.resolve import SBoNOverrides, SettingsError, resolve_params
from engine.sbon import SBoNEngine
from engine.selection import selection_weights
from engine.types import Candidate, SamplingSettings, SBoNParams, SBoNResult
from reward.base import RewardBounds

MAX_TOKENS = 16


def word_sum(text: str) -> float:
    """A reward that partial texts predict well: the mean token id of the words so far."""
    words = text.split()
    return sum(int(w[1:]) for w in words) / max(1, len(words))


def bad_words(text: str) -> int:
    return sum(1 for w in text.split() if int(w[1:]) < 130)


@dataclass
class BoundedFake(FakeScorer):
    """Reward = minus the number of "bad" words (ids below 130): more words can only add
    bad ones, so a partial text bounds every completion of it."""

    never_choose_negative_infinity: ClassVar[bool] = True

    async def bounds(self, prompts: Sequence[Prompt],
                     partial_responses: Sequence[str]) -> list[RewardBounds]:
        out = []
        for text in partial_responses:
            left = MAX_TOKENS - len(text.split())
            out.append(RewardBounds(-float(bad_words(text) + left), -float(bad_words(text))))
        return out


def engine(scorer: FakeScorer | None = None, **backend: Any) -> tuple[SBoNEngine, FakeBackend]:
    fake = FakeBackend(**backend)
    return SBoNEngine(fake, {"r": scorer or FakeScorer(fn=word_sum)}, "r"), fake


def rank(every: int = 4, keep: float = 0.5, min_keep: int = 1) -> PruneSettings:
    return PruneSettings(mode="rank", every=every, keep=keep, min_keep=min_keep)


# A stop string that ends about one candidate in ten per word: some finish early, and
# their exact rewards let bound pruning prove others negligible.
STOP = ("w15",)


def run(sbon: SBoNEngine, params: SBoNParams, seed: int | None = 7,
        stop: tuple[str, ...] = ()) -> SBoNResult:
    return asyncio.run(sbon.run("a prompt", params, SamplingSettings(
        max_tokens=MAX_TOKENS, seed=seed, stop=stop), "req"))


def test_rank_pruning_aborts_the_pruned_and_the_survivors_finish() -> None:
    sbon, fake = engine()
    result = run(sbon, SBoNParams(n=8, lam=0.5, prune=rank()))
    report = result.pruning
    assert report is not None and report.mode == "rank"
    assert report.pruned == 7 and report.checkpoints == 3  # 8 -> 4 -> 2 -> 1 at 4, 8, 12
    assert sorted(a for a in report.pruned_at if a is not None) == [4, 4, 4, 4, 8, 8, 12]
    assert len(fake.aborted) == 7 and not fake.running
    candidates = result.final_block.candidates
    for candidate, at in zip(candidates, report.pruned_at, strict=True):
        if at is None:
            assert len(candidate.token_ids) == MAX_TOKENS and candidate.finish_reason == "length"
        else:
            assert at <= len(candidate.token_ids) < MAX_TOKENS and candidate.weight == 0.0
            assert candidate.reward == -math.inf
    assert report.pruned_at[result.chosen_index] is None
    assert result.tokens_generated == sum(len(c.token_ids) for c in candidates)


def test_the_kept_candidates_are_the_best_by_partial_reward() -> None:
    sbon, _ = engine()
    result = run(sbon, SBoNParams(n=8, lam=0.5, prune=rank(every=8, keep=0.5)))
    report = result.pruning
    assert report is not None
    partial = [word_sum(" ".join(c.text.split()[:8])) for c in result.final_block.candidates]
    pruned_first = [i for i, at in enumerate(report.pruned_at) if at == 8]
    kept_first = [i for i, at in enumerate(report.pruned_at) if at is None or at > 8]
    assert len(kept_first) == 4 and min(partial[i] for i in kept_first) >= max(
        partial[i] for i in pruned_first)


def test_seeded_pruning_is_reproducible() -> None:
    params = SBoNParams(n=6, lam=1.0, prune=rank(every=3, keep=0.6))
    first, second = (run(engine()[0], params, seed=21) for _ in range(2))
    assert first.pruning == second.pruning and first.text == second.text
    other = run(engine()[0], params, seed=500)  # seeds 500.. share no sample with 21..
    assert other.text != first.text


def test_pruning_computes_fewer_tokens_than_the_same_request_unpruned() -> None:
    unpruned = run(engine()[0], SBoNParams(n=8, lam=0.5))
    pruned = run(engine()[0], SBoNParams(n=8, lam=0.5, prune=rank()))
    assert unpruned.tokens_generated == 8 * MAX_TOKENS
    assert pruned.tokens_computed < unpruned.tokens_computed
    assert unpruned.tokens_computed == (unpruned.tokens_generated
                                        + unpruned.prefill_generation.computed
                                        + unpruned.prefill_scoring.computed)


async def _full_candidates(fake: FakeBackend, n: int, seed: int,
                           stop: tuple[str, ...] = ()) -> list[Candidate]:
    """Every candidate generated to the end with the seeds online pruning gives them."""
    prompt_ids = fake.encode_prompt("a prompt")
    sampling = SamplingSettings(max_tokens=MAX_TOKENS, stop=stop)
    return [await fake.sample_one(prompt_ids, sampling,
                                  MAX_TOKENS, f"full-{i}", sample_seed(seed, i),
                                  on_output=lambda ids, prefill: None) for i in range(n)]


@pytest.mark.parametrize("mode", ["rank", "bound"])
def test_online_pruning_takes_the_offline_replays_decisions(mode: str) -> None:
    settings = rank(every=4, keep=0.5) if mode == "rank" else PruneSettings(
        mode="bound", every=4, epsilon=0.05)
    scorer = BoundedFake(fn=lambda t: -bad_words(t))
    sbon, fake = engine(scorer)
    online = run(sbon, SBoNParams(n=8, lam=0.5, prune=settings), seed=5, stop=STOP)
    assert online.pruning is not None and online.pruning.pruned > 0

    async def offline() -> Pruner:
        candidates = await _full_candidates(fake, 8, 5, STOP)
        checkpointer = Checkpointer(Pruner(settings, 8, 0.5), guard(scorer), "a prompt",
                                    fake.encode_prompt("a prompt"))
        return await replay(checkpointer, candidates, MAX_TOKENS, fake.decode)

    assert asyncio.run(offline()).pruned_at == online.pruning.pruned_at


def test_bound_pruning_moves_at_most_epsilon_of_the_unpruned_selection() -> None:
    scorer = BoundedFake(fn=lambda t: -bad_words(t))
    pruned = 0
    for seed in range(6):
        sbon, fake = engine(scorer)
        result = run(sbon, SBoNParams(n=8, lam=0.5, prune=PruneSettings(
            mode="bound", every=4, epsilon=0.1)), seed=seed, stop=STOP)
        report = result.pruning
        assert report is not None and report.distortion_bound is not None
        pruned += report.pruned
        full = asyncio.run(_full_candidates(fake, 8, seed, STOP))
        weights = selection_weights([-bad_words(c.text) for c in full], 0.5)
        assert pruned_mass(weights, report.pruned_at) <= report.distortion_bound + 1e-12
        assert report.distortion_bound <= 0.1 + 1e-12
    assert pruned > 6  # the rule does prune


def test_partial_rewards_may_all_be_never_choose() -> None:
    # A rule reward that refuses every short text: checkpoints must not fail on it.
    scorer = BoundedFake(fn=lambda t: 1.0 if len(t.split()) >= MAX_TOKENS else -math.inf)
    result = run(engine(scorer)[0], SBoNParams(n=4, lam=1.0, prune=rank(every=4)))
    assert result.pruning is not None and result.final_block.chosen.reward == 1.0


def test_bound_mode_needs_a_reward_with_bounds() -> None:
    sbon, _ = engine(FakeScorer(fn=word_sum))
    params = SBoNParams(n=4, prune=PruneSettings(mode="bound"))
    with pytest.raises(SettingsError) as refused:
        sbon.check_prune(params)
    assert refused.value.param == "prune.mode"
    with pytest.raises(SettingsError):
        run(sbon, params)
    engine(BoundedFake())[0].check_prune(params)  # a bounded reward is fine


DEFAULTS = SBoNDefaults(n=4, prune=rank())


def test_the_configured_default_prunes_per_response_requests_only() -> None:
    assert resolve_params(DEFAULTS, SBoNOverrides()).prune == rank()
    blockwise = resolve_params(DEFAULTS, SBoNOverrides(block_size=8, block_size_given=True))
    assert blockwise.prune is None
    opted_out = resolve_params(DEFAULTS, SBoNOverrides(prune=None, prune_given=True))
    assert opted_out.prune is None
    assert resolve_params(DEFAULTS, SBoNOverrides(n=1)).prune is None  # nothing to prune
    assert resolve_params(SBoNDefaults(), SBoNOverrides()).prune is None  # off by default


@pytest.mark.parametrize(("overrides", "param"), [
    (SBoNOverrides(block_size=8, block_size_given=True, prune=rank(), prune_given=True),
     "prune"),
    (SBoNOverrides(kl_budget=0.5, prune=PruneSettings(mode="bound"), prune_given=True),
     "prune.mode"),
    (SBoNOverrides(normalize=Normalization.ZSCORE, prune=PruneSettings(mode="bound"),
                   prune_given=True), "prune.mode"),
])
def test_settings_pruning_cannot_work_with_are_refused(overrides: SBoNOverrides,
                                                        param: str) -> None:
    with pytest.raises(SettingsError) as refused:
        resolve_params(SBoNDefaults(), overrides)
    assert refused.value.param == param


@pytest.mark.parametrize(("fields", "loc"), [
    ({"mode": "bound", "keep": 0.5}, "keep"),
    ({"mode": "rank", "epsilon": 0.1}, "epsilon"),
    ({"mode": "rank", "every": 0}, "every"),
    ({"mode": "rank", "every": 5000}, "every"),
    ({"mode": "rank", "keep": 0.0}, "keep"),
    ({"mode": "rank", "keep": 1.5}, "keep"),
    ({"mode": "bound", "epsilon": -0.1}, "epsilon"),
    ({"mode": "bound", "epsilon": float("nan")}, "epsilon"),
    ({"mode": "rank", "min_keep": 0}, "min_keep"),
    ({"mode": "fast"}, "mode"),
    ({"mode": "rank", "alpha": 0.5}, "alpha"),
    ({}, "mode"),
])
def test_bad_prune_settings_are_refused_naming_the_field(fields: dict[str, Any],
                                                          loc: str) -> None:
    with pytest.raises(ValidationError) as refused:
        PruneSettings.model_validate(fields)
    assert refused.value.errors()[0]["loc"][0] == loc


def test_the_datalog_gives_pruned_candidates_no_reward_and_pairs_skip_them() -> None:
    from bench.export import export_rows
    from server.datalog import build_record

    result = run(engine()[0], SBoNParams(n=4, lam=0.5, prune=rank(every=8)))
    assert result.pruning is not None
    record = build_record(request_id="r", logged_at=0.0, model="m", prompt="a prompt",
                          sampling=SamplingSettings(max_tokens=MAX_TOKENS), result=result)
    rewards = [c["reward"] for c in record["blocks"][0]["candidates"]]
    assert [r is None for r in rewards] == [at is not None for at in result.pruning.pruned_at]
    rows, _ = export_rows([record], "pairs")
    survivors = {c.text for c, at in zip(result.final_block.candidates,
                                         result.pruning.pruned_at, strict=True) if at is None}
    assert len(survivors) == 2 and len(rows) == 1  # keep 0.5 of 4 at the one checkpoint
    assert rows[0]["chosen"] in survivors and rows[0]["rejected"] in survivors


class CachedFake(FakeScorer):
    """A scorer whose queries go through a vLLM prefix cache, as the judge's do."""

    reuses_prefix_cache = True


def test_checkpoints_align_to_kv_blocks_only_for_prefix_cached_rewards() -> None:
    assert checkpoint_block(guard(FakeScorer()), 32) is None
    assert checkpoint_block(guard(CachedFake()), 32) == 32
    assert checkpoint_block(guard(CachedFake()), None) is None
    prune = PruneSettings(mode="rank", every=16, keep=0.5)
    aligned = Checkpointer(Pruner(prune, 4, 1.0), guard(CachedFake()), "p", [0] * 40,
                           block=checkpoint_block(guard(CachedFake()), 32))
    assert aligned.positions(64) == [24, 56]
    plain = Checkpointer(Pruner(prune, 4, 1.0), guard(FakeScorer()), "p", [0] * 40)
    assert plain.positions(64) == [16, 32, 48]
