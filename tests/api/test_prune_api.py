"""Early pruning through the HTTP API: the ``sbon.prune`` object, its report, its 400s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httpx
import openai
import pytest
from api_harness import Served
from fakes import FakeBackend, FakeScorer, mean_id

from common.prompts import Prompt
from reward.base import RewardBounds

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
RANK = {"mode": "rank", "every": 4, "keep": 0.5}


class Bounded(FakeScorer):
    """Reward in [0, 1] with the trivial bounds (0, 1): declared, so bound mode may run."""

    async def bounds(self, prompts: Sequence[Prompt],
                     partial_responses: Sequence[str]) -> list[RewardBounds]:
        return [RewardBounds(0.0, 1.0) for _ in partial_responses]


def sbon_of(reply: Any) -> dict[str, Any]:
    sbon = reply.choices[0].model_extra["sbon"]
    assert isinstance(sbon, dict)
    return sbon


def test_rank_pruning_is_reported_and_stops_engine_requests(served: Served) -> None:
    served.scorers["fake"].fn = mean_id
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=16, seed=3,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 8, "lambda": 0.5, "prune": RANK}})
    sbon = sbon_of(reply)
    prune = sbon["prune"]
    assert prune["mode"] == "rank" and prune["every"] == 4 and prune["checkpoints"] == 3
    assert prune["pruned"] == 7 and len(prune["pruned_at"]) == 8
    assert prune["distortion_bound"] is None
    assert len(served.backend.aborted) == 7
    for at, reward, weight in zip(prune["pruned_at"], sbon["rewards"], sbon["weights"],
                                  strict=True):
        assert (reward is None and weight == 0.0) if at is not None else reward is not None
    assert prune["pruned_at"][sbon["chosen_index"]] is None
    assert sbon["tokens_computed"] == (sbon["tokens_generated"]
                                       + sum(sbon["tokens_prefilled"].values()))
    assert sbon["tokens_generated"] < 8 * 16


def test_pruning_streams_like_any_per_response_request(served: Served) -> None:
    chunks = list(served.client().completions.create(
        model="fake-model", prompt="The sea", max_tokens=12, stream=True, seed=1,
        extra_body={"sbon": {"n": 4, "prune": RANK}}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and len(final) == 1
    sbon = final[0].choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["prune"]["pruned"] == 3 and len(text.split()) == 12


def test_the_configured_default_prunes_and_null_opts_out(
        server_factory: Callable[..., Served]) -> None:
    served = server_factory(sbon={"prune": RANK})
    reply = served.client().completions.create(model="fake-model", prompt="x", max_tokens=8,
                                               extra_body={"sbon": {"n": 4}})
    assert sbon_of(reply)["prune"]["pruned"] > 0
    reply = served.client().completions.create(
        model="fake-model", prompt="x", max_tokens=8,
        extra_body={"sbon": {"n": 4, "prune": None}})
    assert "prune" not in sbon_of(reply)
    blockwise = served.client().completions.create(
        model="fake-model", prompt="x", max_tokens=8,
        extra_body={"sbon": {"n": 2, "block_size": 4}})
    assert "prune" not in sbon_of(blockwise)


def test_bound_mode_runs_with_a_reward_that_declares_bounds(
        server_factory: Callable[..., Served]) -> None:
    served = server_factory(scorers={"fake": Bounded(fn=lambda t: 0.5), "other": FakeScorer()})
    reply = served.client().completions.create(
        model="fake-model", prompt="x", max_tokens=8,
        extra_body={"sbon": {"n": 4, "lambda": 1.0,
                             "prune": {"mode": "bound", "every": 4, "epsilon": 0.05}}})
    prune = sbon_of(reply)["prune"]
    # Bounds of (0, 1) at lambda 1 allow each candidate e/(e+3) > 0.05: nothing is pruned.
    assert prune["mode"] == "bound" and prune["pruned"] == 0
    assert prune["distortion_bound"] == 0.0


@pytest.mark.parametrize(("sbon", "param"), [
    ({"prune": {"mode": "rank", "every": 0}}, "sbon.prune.every"),
    ({"prune": {"mode": "rank", "keep": 0}}, "sbon.prune.keep"),
    ({"prune": {"mode": "rank", "epsilon": 0.1}}, "sbon.prune.epsilon"),
    ({"prune": {"mode": "bound", "keep": 0.5}}, "sbon.prune.keep"),
    ({"prune": {"mode": "bound", "epsilon": 2}}, "sbon.prune.epsilon"),
    ({"prune": {"mode": "rank", "min_keep": 0}}, "sbon.prune.min_keep"),
    ({"prune": {"mode": "sometimes"}}, "sbon.prune.mode"),
    ({"prune": {"mode": "rank", "alpha": 0.5}}, "sbon.prune.alpha"),
    ({"prune": {"every": 8}}, "sbon.prune.mode"),
    ({"block_size": 4, "prune": RANK}, "sbon.prune"),
    ({"prune": {"mode": "bound"}}, "sbon.prune.mode"),  # the fake reward declares no bounds
    ({"kl_budget": 0.5, "prune": {"mode": "bound"}}, "sbon.prune.mode"),
    ({"normalize": "zscore", "prune": {"mode": "bound"}}, "sbon.prune.mode"),
    ({"prune": {"mode": "rank", "every": 1}}, "sbon.prune.every"),  # 99 checkpoints > 64
])
def test_bad_prune_settings_are_a_400_naming_them(served: Served, sbon: dict[str, Any],
                                                  param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().completions.create(model="fake-model", prompt="x", max_tokens=100,
                                           extra_body={"sbon": {"n": 4, **sbon}})
    body = refused.value.body
    assert refused.value.status_code == 400
    assert isinstance(body, dict) and body["param"] == param, body
    assert served.client().completions.create(model="fake-model", prompt="x",
                                              max_tokens=2).choices


def test_metrics_count_computed_tokens_and_pruned_candidates(served: Served) -> None:
    served.client().completions.create(model="fake-model", prompt="x", max_tokens=8,
                                       extra_body={"sbon": {"n": 4, "prune": RANK}})
    text = httpx.get(f"{served.url}/metrics").text
    assert 'sbon_pruned_candidates_total{mode="rank"} 2.0' in text  # one checkpoint: 4 -> 2
    computed = [line for line in text.splitlines()
                if line.startswith("sbon_computed_tokens_total")]
    assert computed and float(computed[0].split()[-1]) > 0


def test_a_backend_without_single_samples_refuses_pruning(
        server_factory: Callable[..., Served]) -> None:
    class Plain(FakeBackend):
        sample_one = None

    served = server_factory(backend=Plain(model_name="fake-model"))
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().completions.create(model="fake-model", prompt="x", max_tokens=8,
                                           extra_body={"sbon": {"n": 4, "prune": RANK}})
    assert refused.value.body["param"] == "sbon.prune"  # type: ignore[index]
