"""Rewards fail closed: non-finite values, blocking functions and errors are a 503 naming
the reward, -inf is "never choose" only where the reward documents it, and every body,
streamed or not, stays strict JSON."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import httpx
import pytest
from fakes import FakeBackend, FakeScorer
from test_limits import CHAT, error_of

from common.config import PythonRewardConfig
from engine.types import Candidate
from reward.python_fn import PythonScorer


def strict_json(text: str) -> Any:
    """Parse as JSON proper: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class NeverChoose(FakeScorer):
    """Documents -inf as "never choose", like the python reward."""

    never_choose_negative_infinity = True


def numbered(call: Any, i: int) -> Candidate:
    """Candidate i of every block is the one-token text "c<i> "."""
    return Candidate((100 + i,), f"c{i} ", -0.5, "length")


def refuse_first_two(response: str) -> float:
    """-inf (never choose) for candidates 0 and 1 of the newest block, 1.0 otherwise."""
    return -math.inf if response.split()[-1] in ("c0", "c1") else 1.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_a_503_naming_the_reward(server_factory, value: float) -> None:
    served = server_factory(scorers={"fake": FakeScorer(fn=lambda r: value),
                                     "other": FakeScorer(fn=len)})
    for stream in (False, True):
        response = served.post("/v1/chat/completions",
                               {**CHAT, "stream": stream, "sbon": {"n": 3}})
        if stream:
            frames = [ln[len("data: "):] for ln in response.text.splitlines() if ln]
            assert frames[-1] == "[DONE]"
            error = strict_json(frames[-2])["error"]
        else:
            error = error_of(response, 503)
        assert error["code"] == "reward_invalid" and error["param"] == "sbon.reward"
        assert "'fake'" in error["message"]
    health = httpx.get(f"{served.url}/health").json()
    assert health["rewards"]["fake"]["last_failure"] == "invalid"
    assert served.post("/v1/chat/completions",
                       {**CHAT, "sbon": {"n": 3, "reward": "other"}}).status_code == 200


def test_minus_infinity_means_never_choose_where_documented(server_factory) -> None:
    served = server_factory(backend=FakeBackend(model_name="fake-model", script=numbered),
                            scorers={"fake": NeverChoose(fn=refuse_first_two),
                                     "other": FakeScorer(fn=len)})
    body = {**CHAT, "max_tokens": 4, "sbon": {"n": 4, "block_size": 1, "lambda": "inf"}}
    for _ in range(3):
        reply = strict_json(served.post("/v1/chat/completions", body).text)
        for block in reply["choices"][0]["sbon"]["blocks"]:
            refused = [i for i, r in enumerate(block["rewards"]) if r == "-inf"]
            assert refused == [0, 1]
            assert all(block["weights"][i] == 0.0 for i in refused)
            assert block["chosen_index"] not in refused
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=10,
                      json={**body, "stream": True}) as response:
        frames = [ln[len("data: "):] for ln in response.iter_lines() if ln]
    assert frames[-1] == "[DONE]"
    chunks = [strict_json(f) for f in frames[:-1]]
    assert any('"-inf"' in json.dumps(c) for c in chunks)
    # Every candidate refused: nothing may be chosen, so the reward has failed.
    served.scorers["fake"].fn = lambda r: -math.inf
    error = error_of(served.post("/v1/chat/completions", body), 503)
    assert error["code"] == "reward_invalid"


def test_a_reward_that_raises_is_503_and_health_reports_it(server_factory) -> None:
    class Broken(FakeScorer):
        async def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            from reward.base import RewardError
            raise RewardError("device lost at 0xdeadbeef")

    served = server_factory(scorers={"fake": Broken(), "other": FakeScorer(fn=len)})
    error = error_of(served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}}), 503)
    assert error["code"] == "reward_unavailable" and "'fake'" in error["message"]
    assert "deadbeef" not in error["message"]
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    fake = health.json()["rewards"]["fake"]
    assert fake["state"] == "failing" and fake["failures"] == 1 and fake["last_failure"] == "error"


def _sleepy(prompt: str, response: str) -> float:
    time.sleep(1.5)
    return 1.0


def test_the_python_reward_runs_off_the_event_loop_and_times_out(server_factory) -> None:
    sleepy = PythonScorer(PythonRewardConfig(name="fake", type="python", timeout_s=0.5,
                                             function=f"{__name__}:_sleepy"))
    served = server_factory(scorers={"fake": sleepy, "other": FakeScorer(fn=len)})
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=served.post(
        "/v1/chat/completions", {**CHAT, "sbon": {"n": 2}})))
    worker.start()
    time.sleep(0.2)  # the function is sleeping in its worker thread now
    started = time.monotonic()
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.3  # the event loop was free
    worker.join()
    error = error_of(result["r"], 503)
    assert error["code"] == "reward_timeout" and "'fake'" in error["message"]
    assert served.state.admission.in_flight == 0
    assert served.post("/v1/chat/completions",
                       {**CHAT, "sbon": {"n": 2, "reward": "other"}}).status_code == 200


def _verifier(prompt: str, response: str) -> float:
    return -math.inf if response.startswith("c0") else 1.0  # a failed check


def test_the_python_reward_may_return_minus_infinity(server_factory) -> None:
    verifier = PythonScorer(PythonRewardConfig(name="fake", type="python",
                                               function=f"{__name__}:_verifier"))
    served = server_factory(backend=FakeBackend(model_name="fake-model", script=numbered),
                            scorers={"fake": verifier, "other": FakeScorer(fn=len)})
    for seed in range(6):
        response = served.post("/v1/chat/completions",
                               {**CHAT, "seed": seed, "sbon": {"n": 4, "lambda": "inf"}})
        sbon = strict_json(response.text)["choices"][0]["sbon"]
        assert sbon["rewards"] == ["-inf", 1.0, 1.0, 1.0]
        assert sbon["weights"][0] == 0.0 and sbon["chosen_index"] != 0
