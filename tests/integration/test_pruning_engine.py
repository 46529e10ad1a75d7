"""Early pruning on the real engine: pruned requests are aborted, survivors finish exactly as
unpruned, seeded pruning repeats, it computes fewer tokens, and the offline replay of the
same candidates takes the same decisions."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from common.prompts import Message, Prompt
from common.prune import PruneSettings
from engine.pruned import Checkpointer, replay
from engine.pruning import Pruner, checkpoints, pruned_mass
from engine.sbon import SBoNEngine
from engine.selection import selection_weights
from engine.types import Candidate, SamplingSettings, SBoNParams, SBoNResult
from reward.base import RewardBounds

PROMPT = (Message("user", "Tell a long story about a lighthouse keeper and the sea."),)
N, TOKENS = 4, 48
RANK = PruneSettings(mode="rank", every=8, keep=0.5)
SAMPLING = SamplingSettings(max_tokens=TOKENS, seed=5)


async def _run(runtime, params: SBoNParams, name: str) -> SBoNResult:
    result: SBoNResult = await runtime.sbon.run(PROMPT, params, SAMPLING, name)
    return result


def _candidates(result: SBoNResult) -> list[Candidate]:
    return [Candidate(c.token_ids, c.text, c.cumulative_logprob, c.finish_reason,
                      c.stop_reason) for c in result.final_block.candidates]


async def _idle(runtime) -> bool:
    for _ in range(50):
        if runtime.backend.num_unfinished_requests() == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_rank_pruning_aborts_the_pruned_and_the_survivors_finish_unchanged(
        runtime) -> None:
    full = await _run(runtime, SBoNParams(n=N, lam=0.5), "it-prune-full")
    pruned = await _run(runtime, SBoNParams(n=N, lam=0.5, prune=RANK), "it-prune-rank")
    report = pruned.pruning
    assert report is not None and report.pruned >= 2  # keep 0.5 of 4 at the first checkpoint
    assert await _idle(runtime)  # no engine request is left running
    for at, cut, whole in zip(report.pruned_at, pruned.final_block.candidates,
                              full.final_block.candidates, strict=True):
        if at is None:  # a survivor is the very sample unpruned decoding drew
            assert cut.token_ids == whole.token_ids and cut.text == whole.text
            assert cut.finish_reason in {"stop", "length"}
        else:  # a pruned one stopped early (unless it ended meanwhile), on the same tokens
            assert cut.token_ids == whole.token_ids[:len(cut.token_ids)]
            assert at <= len(cut.token_ids) <= len(whole.token_ids)
            assert cut.weight == 0.0 and cut.reward == -math.inf
    assert report.pruned_at[pruned.chosen_index] is None
    # Fewer tokens decoded and, all told, fewer computed.
    assert pruned.tokens_generated < full.tokens_generated
    assert pruned.tokens_computed < full.tokens_computed


async def test_seeded_pruning_is_reproducible(runtime) -> None:
    params = SBoNParams(n=N, lam=0.5, prune=RANK)
    first = await _run(runtime, params, "it-prune-seed-a")
    second = await _run(runtime, params, "it-prune-seed-b")
    assert first.pruning is not None and second.pruning is not None
    assert first.pruning.pruned_at == second.pruning.pruned_at
    assert first.text == second.text and first.chosen_index == second.chosen_index


async def test_online_pruning_takes_the_decisions_of_the_offline_replay(
        runtime) -> None:
    online = await _run(runtime, SBoNParams(n=N, lam=0.5, prune=RANK), "it-prune-online")
    full = await _run(runtime, SBoNParams(n=N, lam=0.5), "it-prune-offline")
    judge = runtime.sbon.scorers["judge"]
    prompt_ids = runtime.backend.encode_prompt(PROMPT)
    block = runtime.backend.kv_block_tokens
    checkpointer = Checkpointer(Pruner(RANK, N, 0.5), judge, PROMPT, prompt_ids, block=block)
    offline = await replay(checkpointer, _candidates(full), TOKENS, runtime.backend.decode)
    assert online.pruning is not None
    assert offline.pruned_at == online.pruning.pruned_at
    # The checkpoints land where prompt + response fill whole KV blocks (when one does
    # before the end), so the judge's checkpoint queries find the partial responses cached.
    at = checkpointer.positions(TOKENS)
    assert block is not None and at != checkpoints(RANK.every, TOKENS)
    assert all((len(prompt_ids) + c) % block == 0 for c in at)
    assert {c for c in online.pruning.pruned_at if c is not None} <= set(at)


class NoLetterE:
    """1 when the response has no letter "e", else 0: once an "e" appears, every
    completion scores 0, so a partial response bounds its final reward."""

    name = "no-e"
    timeout_s = 30.0
    never_choose_negative_infinity = False
    reuses_prefix_cache = False
    healthy = True

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return [0.0 if "e" in r.lower() else 1.0 for r in responses]

    async def bounds(self, prompts: Sequence[Prompt],
                     partial_responses: Sequence[str]) -> list[RewardBounds]:
        return [RewardBounds(0.0, 0.0) if "e" in r.lower() else RewardBounds(0.0, 1.0)
                for r in partial_responses]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_bound_pruning_on_the_engine_moves_at_most_epsilon(
        runtime) -> None:
    sbon = SBoNEngine(runtime.backend, {"no-e": NoLetterE()}, "no-e")
    settings = PruneSettings(mode="bound", every=8, epsilon=0.2)
    pruned = await sbon.run(PROMPT, SBoNParams(n=N, lam=0.25, prune=settings), SAMPLING,
                            "it-prune-bound")
    full = await sbon.run(PROMPT, SBoNParams(n=N, lam=0.25), SAMPLING, "it-prune-bound-full")
    report = pruned.pruning
    assert report is not None and report.distortion_bound is not None
    assert report.checkpoints >= 1  # the reward's bounds were asked through its guard
    weights = selection_weights(full.final_block.rewards, 0.25)
    assert pruned_mass(weights, report.pruned_at) <= report.distortion_bound <= 0.2 + 1e-12
