"""The real vLLM engine on the embedded model, in process: both modes, seeds, rewards, aborts.

One engine serves the whole test session (the ``runtime`` fixture). Token counts stay
small: the CPU generates about fifty tokens a second.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from common.prompts import Message
from engine.sbon import UnknownRewardError
from engine.selection import kl_bon_bound
from engine.types import SamplingSettings, SBoNParams, SBoNResult, TextEvent

PROMPT = (Message("user", "Write a haiku about the sea."),)


def check_result(result: SBoNResult, n: int) -> None:
    for block in result.blocks:
        assert len(block.candidates) == n
        assert sum(block.weights) == pytest.approx(1.0)
        assert all(math.isfinite(r) for r in block.rewards)
        assert 0 <= block.chosen_index < n
        assert 0.0 <= block.kl_from_uniform <= math.log(n) + 1e-9
        assert 0.0 <= block.kl_estimate <= kl_bon_bound(n) + 1e-9
        assert all(c.cumulative_logprob is not None and c.cumulative_logprob <= 0
                   for c in block.candidates)
    assert result.finish_reason in {"stop", "length"}
    assert result.tokens_generated >= result.completion_tokens > 0
    assert result.timings["generation"] > 0 and result.timings["scoring"] > 0


async def test_per_response_sbon_with_the_judge(runtime) -> None:
    result = await runtime.sbon.run(PROMPT, SBoNParams(n=4, lam=0.5),
                                    SamplingSettings(max_tokens=16, seed=1), "it-resp")
    check_result(result, 4)
    assert len(result.blocks) == 1 and result.reward_name == "judge"
    assert result.text == result.blocks[0].chosen.text


async def test_blockwise_sbon_continues_block_by_block(runtime) -> None:
    result = await runtime.sbon.run(PROMPT, SBoNParams(n=3, lam=1.0, block_size=8),
                                    SamplingSettings(max_tokens=24, seed=2), "it-block")
    check_result(result, 3)
    assert 1 <= len(result.blocks) <= 3
    chosen_ids = [t for b in result.blocks for t in b.chosen.token_ids]
    assert result.token_ids == chosen_ids
    if result.finish_reason == "length":
        assert len(result.token_ids) == 24
    decoded = runtime.backend.decode(result.token_ids)
    assert decoded.strip() == result.text.strip()


async def test_a_seeded_request_is_reproducible(runtime) -> None:
    params = SBoNParams(n=3, lam=0.5, block_size=8)
    sampling = SamplingSettings(max_tokens=16, seed=42)
    first = await runtime.sbon.run(PROMPT, params, sampling, "it-seed-1")
    second = await runtime.sbon.run(PROMPT, params, sampling, "it-seed-2")
    assert first.text == second.text
    assert [b.chosen_index for b in first.blocks] == [b.chosen_index for b in second.blocks]
    other = await runtime.sbon.run(PROMPT, params, SamplingSettings(max_tokens=16, seed=43),
                                   "it-seed-3")
    assert [c.text for c in other.blocks[0].candidates] != [
        c.text for c in first.blocks[0].candidates]


async def test_hard_best_of_n_with_a_rule_reward_takes_the_best(runtime) -> None:
    result = await runtime.sbon.run(PROMPT, SBoNParams(n=4, lam=0.0, reward="length"),
                                    SamplingSettings(max_tokens=12, seed=5), "it-hard")
    block = result.blocks[0]
    assert block.rewards[block.chosen_index] == max(block.rewards)
    assert block.rewards == [float(len(c.text)) for c in block.candidates]


async def test_stop_strings_end_a_blockwise_response(runtime) -> None:
    # lambda = inf draws uniformly whatever the rewards, so the same seeded request without
    # stop strings is the same generation, continued past the first stop string.
    params = SBoNParams(n=2, lam=math.inf, block_size=8)
    stops = ("\n", ".")
    reference = await runtime.sbon.run(PROMPT, params, SamplingSettings(max_tokens=48, seed=3),
                                       "it-stop-reference")
    cuts = [reference.text.find(s) for s in stops if s in reference.text]
    assert cuts, f"the model produced no stop string to stop at: {reference.text!r}"
    cut = min(cuts)
    result = await runtime.sbon.run(PROMPT, params,
                                    SamplingSettings(max_tokens=48, seed=3, stop=stops),
                                    "it-stop")
    assert result.finish_reason == "stop"
    assert result.text == reference.text[:cut]
    assert not any(s in result.text for s in stops)
    assert result.token_ids == reference.token_ids[:len(result.token_ids)]


async def test_judge_log_probabilities_are_real(runtime) -> None:
    ids = runtime.backend.encode_prompt(PROMPT)
    answer = await runtime.backend.label_logprobs(ids, ["Yes", "No"])
    yes, no = answer.values
    assert yes <= 0.0 and no <= 0.0 and math.isfinite(yes) and math.isfinite(no)
    assert answer.computed_tokens + answer.cached_tokens == len(ids)
    scores = await runtime.scorers["judge"].score(["Say hi."] * 2, ["Hi!", "zzzz qqqq"])
    assert all(math.isfinite(s) for s in scores)


async def test_unknown_reward_name(runtime) -> None:
    with pytest.raises(UnknownRewardError):
        await runtime.sbon.run(PROMPT, SBoNParams(reward="absent"),
                               SamplingSettings(max_tokens=4), "it-unknown")


async def test_requests_run_concurrently_and_cancelled_ones_leave_the_engine(runtime) -> None:
    backend = runtime.backend
    params = SBoNParams(n=1, lam=math.inf, score=False)
    tasks = [asyncio.create_task(runtime.sbon.run(PROMPT, params,
                                                  SamplingSettings(max_tokens=200), f"it-c{i}"))
             for i in range(2)]
    seen = 0
    for _ in range(300):
        await asyncio.sleep(0.02)
        seen = max(seen, backend.num_unfinished_requests())
        if seen >= 2:
            break
    assert seen >= 2, "two requests never ran in the engine at the same time"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(100):
        if backend.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert backend.num_unfinished_requests() == 0


async def test_plain_decoding_streams_tokens_from_the_engine(runtime) -> None:
    params = SBoNParams(n=1, lam=math.inf, score=False)
    sampling = SamplingSettings(max_tokens=16, seed=11)
    events = [e async for e in runtime.sbon.stream(PROMPT, params, sampling, "it-tokens",
                                                   token_stream=True)]
    texts = [e.text_delta for e in events if isinstance(e, TextEvent)]
    result = events[-1]
    assert isinstance(result, SBoNResult)
    assert len(texts) >= 2 and "".join(texts) == result.text
    assert result.blocks[0].chosen.cumulative_logprob is not None
    assert result.blocks[0].chosen.cumulative_logprob < 0
    same = await runtime.sbon.run(PROMPT, params, sampling, "it-tokens-2")
    assert same.token_ids == result.token_ids  # streaming does not change the sample
