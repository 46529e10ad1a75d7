"""The soft best-of-n loop with a fake backend: blocks, stops, seeds, rewards, accounting."""

from __future__ import annotations

import math

import pytest
from fakes import Call, FakeBackend, FakeScorer, stop_at_stop_strings

from common.config import SBoNDefaults
from engine.blocks import find_stop, held_back
from engine.resolve import SBoNOverrides, resolve_params
from engine.sbon import SBoNEngine, UnknownRewardError
from engine.seeds import BLOCK_SEED_STRIDE
from engine.selection import kl_bon_bound
from engine.types import (
    BlockEvent,
    Candidate,
    SamplingSettings,
    SBoNParams,
    SBoNResult,
    TextEvent,
)


def make_engine(backend: FakeBackend, scorer: FakeScorer | None = None) -> SBoNEngine:
    return SBoNEngine(backend, {"fake": scorer or FakeScorer()}, "fake")


async def test_per_response_mode_is_one_selection_of_whole_responses() -> None:
    backend = FakeBackend(script=lambda call, i: Candidate(
        tuple(range(i + 1)), "x" * (i + 1), -1.0, "stop"))
    result = await make_engine(backend).run(
        "p", SBoNParams(n=4, lam=0.0), SamplingSettings(max_tokens=50, seed=1), "r")
    assert len(backend.calls) == 1 and backend.calls[0].n == 4
    assert backend.calls[0].max_tokens == 50
    assert result.chosen_index == 3 and result.text == "xxxx"  # hard BoN takes the longest
    assert result.finish_reason == "stop"
    assert result.tokens_generated == 1 + 2 + 3 + 4


async def test_blockwise_continues_from_the_chosen_token_ids() -> None:
    backend = FakeBackend()
    result = await make_engine(backend).run(
        "p", SBoNParams(n=3, lam=0.5, block_size=4), SamplingSettings(max_tokens=10, seed=5), "r")
    assert [c.max_tokens for c in backend.calls] == [4, 4, 2]
    prefix = [1, 2, 3]
    for call, block in zip(backend.calls, result.blocks, strict=True):
        assert call.prompt_token_ids == prefix
        prefix = prefix + list(block.chosen.token_ids)
    assert result.token_ids == prefix[3:] and len(result.token_ids) == 10
    assert result.finish_reason == "length"
    assert result.text == "".join(b.chosen.text for b in result.blocks)


async def test_block_seeds_are_distinct_and_derived_from_the_request_seed() -> None:
    backend = FakeBackend()
    await make_engine(backend).run(
        "p", SBoNParams(n=2, block_size=2), SamplingSettings(max_tokens=6, seed=11), "r")
    assert [c.seed for c in backend.calls] == [11 + k * BLOCK_SEED_STRIDE for k in range(3)]
    unseeded = FakeBackend()
    await make_engine(unseeded).run(
        "p", SBoNParams(n=2, block_size=2), SamplingSettings(max_tokens=4), "r")
    assert all(c.seed is None for c in unseeded.calls)


async def test_reward_sees_prefix_plus_block() -> None:
    scorer = FakeScorer()
    result = await make_engine(FakeBackend(), scorer).run(
        "prompt", SBoNParams(n=2, block_size=2), SamplingSettings(max_tokens=4, seed=0), "r")
    first_chosen = result.blocks[0].chosen.text
    second_block_inputs = [r for _, r in scorer.seen[2:]]
    assert all(r.startswith(first_chosen) for r in second_block_inputs)
    assert all(p == "prompt" for p, _ in scorer.seen)
    assert result.tokens_scored == 2 * 2 + 2 * 4


def _stop_after_first_block(call: Call, i: int) -> Candidate:
    if len(call.prompt_token_ids) == 3:
        return Candidate((7, 8), "ok", -0.1, "length")
    return Candidate((9,), "", -0.1, "stop")  # end of sequence at the second block


async def test_end_of_sequence_ends_the_response() -> None:
    backend = FakeBackend(script=_stop_after_first_block)
    result = await make_engine(backend).run(
        "p", SBoNParams(n=2, block_size=2), SamplingSettings(max_tokens=20), "r")
    assert len(result.blocks) == 2 and result.finish_reason == "stop"
    assert result.text == "ok"


def test_the_fake_backend_stops_at_a_stop_string_like_vllm() -> None:
    words = Candidate((101, 102, 103), "w101 w102 w103 ", -1.5, "length")
    assert stop_at_stop_strings(words, ("zzz",)) is words
    stopped = stop_at_stop_strings(words, ("w103", "w102"))  # the earliest one stops
    assert (stopped.text, stopped.token_ids) == ("w101 ", (101, 102))
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", "w102")
    scripted = stop_at_stop_strings(Candidate((1, 2), "hello END x", -1.0, "length"), ("END",))
    assert (scripted.text, scripted.token_ids, scripted.finish_reason) == (
        "hello ", (1, 2), "stop")


@pytest.mark.parametrize("params", [
    SBoNParams(n=1, lam=math.inf, score=False),
    SBoNParams(n=3, lam=math.inf),
    SBoNParams(n=1, lam=math.inf, block_size=3, score=False),
    SBoNParams(n=3, lam=math.inf, block_size=3),
], ids=["plain", "per-response", "blockwise-plain", "blockwise"])
async def test_a_stop_string_the_model_produced_ends_the_response_with_stop(
    params: SBoNParams,
) -> None:
    # lambda = inf: the draws do not depend on the rewards, so the run without stop strings
    # is the same generation as the run with them, up to the stop string.
    sampling = SamplingSettings(max_tokens=9, seed=7)
    reference = await make_engine(FakeBackend()).run("p", params, sampling, "r")
    assert reference.finish_reason == "length" and len(reference.token_ids) == 9
    stop = reference.text.split()[4]  # a word the model produced, in the second block
    cut = reference.text.index(stop)
    assert cut > 0
    backend = FakeBackend()
    result = await make_engine(backend).run(
        "p", params, SamplingSettings(max_tokens=9, seed=7, stop=(stop,)), "r")
    assert result.finish_reason == "stop"
    assert result.text == reference.text[:cut] and stop not in result.text
    assert result.token_ids == reference.token_ids[:len(result.token_ids)]
    assert len(result.token_ids) < len(reference.token_ids)
    chosen = result.blocks[-1].chosen
    assert chosen.finish_reason == "stop"
    assert backend.sampling_seen[-1].stop == (stop,)  # the engine was given the stop string


async def test_stop_string_spanning_two_blocks_is_found() -> None:
    texts = iter(["hello EN", "D world"])

    def script(call: Call, i: int) -> Candidate:
        text = next(texts) if i == 0 else "zz"
        return Candidate((5, 6), text, -0.1, "length")

    engine = SBoNEngine(FakeBackend(script=script),
                        {"fake": FakeScorer(fn=lambda r: -r.count("z"))}, "fake")
    events = [e async for e in engine.stream(
        "p", SBoNParams(n=2, lam=0.0, block_size=2),
        SamplingSettings(max_tokens=20, stop=("END",)), "r")]
    result = events[-1]
    assert isinstance(result, SBoNResult)
    assert result.text == "hello " and result.finish_reason == "stop"
    deltas = [e.text_delta for e in events if isinstance(e, BlockEvent)]
    assert "".join(deltas) == "hello "
    assert [e.finished for e in events if isinstance(e, BlockEvent)] == [False, True]


async def test_diagnostics_add_up_over_blocks() -> None:
    result = await make_engine(FakeBackend()).run(
        "p", SBoNParams(n=4, lam=1.0, block_size=3), SamplingSettings(max_tokens=9, seed=2), "r")
    d = result.diagnostics
    assert len(result.blocks) == 3
    assert d.kl_from_uniform == pytest.approx(sum(b.kl_from_uniform for b in result.blocks))
    assert d.kl_bon_bound == pytest.approx(3 * kl_bon_bound(4))
    assert d.kl_estimate == pytest.approx(sum(b.kl_estimate for b in result.blocks))
    assert 0.0 <= d.kl_from_uniform <= 3 * math.log(4) + 1e-9
    assert 1.0 <= d.ess <= 4.0
    assert set(result.timings) == {"generation", "scoring", "selection"}


async def test_seeded_request_is_reproducible() -> None:
    async def run() -> SBoNResult:
        return await make_engine(FakeBackend()).run(
            "p", SBoNParams(n=4, lam=0.3, block_size=2), SamplingSettings(max_tokens=6, seed=3),
            "r")

    first, second = await run(), await run()
    assert first.text == second.text
    assert [b.chosen_index for b in first.blocks] == [b.chosen_index for b in second.blocks]


async def test_plain_decoding_calls_no_reward() -> None:
    scorer = FakeScorer()
    result = await make_engine(FakeBackend(), scorer).run(
        "p", SBoNParams(n=1, lam=math.inf, score=False), SamplingSettings(max_tokens=5), "r")
    assert scorer.seen == [] and result.tokens_scored == 0
    assert result.completion_tokens == 5


async def test_context_limit_ends_a_blockwise_response() -> None:
    backend = FakeBackend(max_model_len=7)
    result = await make_engine(backend).run(
        "p", SBoNParams(n=2, block_size=2), SamplingSettings(max_tokens=100), "r")
    assert result.finish_reason == "length"
    assert len(result.token_ids) + 3 >= 7 and len(backend.calls) == 2


async def test_unknown_reward_is_refused() -> None:
    with pytest.raises(UnknownRewardError):
        await make_engine(FakeBackend()).run(
            "p", SBoNParams(reward="nope"), SamplingSettings(max_tokens=2), "r")


def test_find_stop_only_looks_at_new_text() -> None:
    assert find_stop("abc END xyz", ["END"], 5) == 4
    assert find_stop("END abc", ["END"], 4) is None
    assert find_stop("a.b;c", [";", "."], 2) == 3


def test_held_back_keeps_possible_stop_prefixes() -> None:
    assert held_back("hello EN", ["END"]) == 2
    assert held_back("hello E", ["END", "EX"]) == 1
    assert held_back("hello", ["END"]) == 0
    assert held_back("x", []) == 0


async def test_plain_decoding_streams_token_deltas_when_asked() -> None:
    scorer = FakeScorer()
    engine = make_engine(FakeBackend(), scorer)
    params = SBoNParams(n=1, lam=math.inf, score=False)
    sampling = SamplingSettings(max_tokens=4, seed=8)
    events = [e async for e in engine.stream("p", params, sampling, "r", token_stream=True)]
    texts = [e.text_delta for e in events if isinstance(e, TextEvent)]
    result = events[-1]
    assert isinstance(result, SBoNResult) and len(texts) == 4
    assert "".join(texts) == result.text and scorer.seen == []
    block_events = [e for e in events if isinstance(e, BlockEvent)]
    assert len(block_events) == 1 and block_events[0].text_delta == ""  # nothing sent twice
    # The same request without token streaming gives the same text in one block event.
    whole = await engine.run("p", params, sampling, "r")
    assert whole.text == result.text and whole.token_ids == result.token_ids


async def test_token_streaming_applies_only_to_plain_decoding() -> None:
    engine = make_engine(FakeBackend())
    events = [e async for e in engine.stream("p", SBoNParams(n=2), SamplingSettings(max_tokens=3),
                                             "r", token_stream=True)]
    assert not any(isinstance(e, TextEvent) for e in events)


async def test_one_candidate_resolved_from_a_callers_options_pays_no_reward_call() -> None:
    # What ``sbon generate --n 1`` and a request's ``"sbon": {"n": 1}`` resolve to.
    scorer = FakeScorer()
    for block_size in (None, 2):
        params = resolve_params(SBoNDefaults(n=4), SBoNOverrides(
            n=1, block_size=block_size, block_size_given=True))
        assert params.score is False
        result = await make_engine(FakeBackend(), scorer).run(
            "p", params, SamplingSettings(max_tokens=4, seed=1), "r")
        assert result.tokens_scored == 0 and len(result.token_ids) == 4
    assert scorer.seen == []
    # The same scorer is called as soon as there are candidates to choose from.
    more = resolve_params(SBoNDefaults(n=4), SBoNOverrides(n=2))
    await make_engine(FakeBackend(), scorer).run(
        "p", more, SamplingSettings(max_tokens=4, seed=1), "r")
    assert len(scorer.seen) == 2
