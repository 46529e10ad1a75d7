"""Every failure answers with OpenAI's error envelope and the right status code."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from api_harness import Served, wait_ready
from fakes import FakeBackend, FakeScorer

from reward.base import RewardError

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("change", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"sbon": {"n": 0}}, "sbon.n"),
    ({"sbon": {"lambda": -1}}, "sbon.lambda"),
    ({"sbon": {"lambda": "warm"}}, "sbon.lambda"),
    ({"sbon": {"normalize": "minmax"}}, "sbon.normalize"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"stop": ["a"] * 17}, "stop"),
])
def test_invalid_values_are_400_with_the_parameter(served: Served, change: dict,
                                                   param: str) -> None:
    error = error_of(served.post("/v1/chat/completions", {**CHAT, **change}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)


def test_missing_fields_and_bad_json_are_400(served: Served) -> None:
    error = error_of(served.post("/v1/chat/completions", {"model": "fake-model"}), 400)
    assert error["param"] == "messages"
    bad = httpx.post(f"{served.url}/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert error_of(bad, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(("extra", "param"), [
    ({"bogus_field": 1}, "bogus_field"),
    ({"sbon": {"n": 2, "temperature": 3}}, "sbon.temperature"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_parameters_are_refused_by_name(served: Served, extra: dict,
                                                     param: str) -> None:
    error = error_of(served.post("/v1/chat/completions", {**CHAT, **extra}), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert param.split(".")[-1] in error["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(served: Served) -> None:
    body = {**CHAT, "logprobs": False, "response_format": {"type": "text"}, "tools": None}
    assert served.post("/v1/chat/completions", body).status_code == 200
    echo = {"model": "fake-model", "prompt": "x", "max_tokens": 2, "echo": False}
    assert served.post("/v1/completions", echo).status_code == 200
    error = error_of(served.post("/v1/completions", {**echo, "echo": True}), 400)
    assert error["param"] == "echo"


@pytest.mark.parametrize(("change", "param"), [
    ({"sbon": {"n": 17}}, "sbon.n"),
    ({"max_tokens": 1025}, "max_tokens"),
    ({"max_tokens": 100, "sbon": {"block_size": 1}}, "sbon.block_size"),
    ({"n": 5}, "n"),
])
def test_server_limits_are_400_naming_the_parameter(served: Served, change: dict,
                                                    param: str) -> None:
    error = error_of(served.post("/v1/chat/completions", {**CHAT, **change}), 400)
    assert error["param"] == param and error["code"] == "limit_exceeded"


def test_context_length_is_checked(server_factory) -> None:
    served = server_factory(backend=FakeBackend(model_name="fake-model", max_model_len=10))
    body = {"model": "fake-model", "prompt": "a b c d e f", "max_tokens": 5}
    error = error_of(served.post("/v1/completions", body), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    long_prompt = {"model": "fake-model", "prompt": " ".join(["w"] * 20)}
    assert error_of(served.post("/v1/completions", long_prompt), 400)["param"] == "prompt"


def test_unknown_model_and_reward_are_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    error = error_of(served.post("/v1/chat/completions",
                                 {**CHAT, "sbon": {"reward": "absent"}}), 404)
    assert error["param"] == "sbon.reward" and error["code"] == "reward_not_found"
    assert error_of(httpx.get(f"{served.url}/v1/nothing"), 404)["type"]


def test_429_when_the_concurrency_cap_is_reached(server_factory) -> None:
    served = server_factory(backend=FakeBackend(model_name="fake-model", delay_s=1.0),
                            limits={"max_concurrent_requests": 1})
    slow = threading.Thread(target=served.post, args=("/v1/chat/completions", CHAT))
    slow.start()
    deadline = time.monotonic() + 5
    while served.state.admission.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        served.client().chat.completions.create(model="fake-model", messages=CHAT["messages"])
    assert caught.value.status_code == 429
    slow.join()
    assert served.post("/v1/chat/completions", CHAT).status_code == 200  # the slot came back


def test_503_while_loading_then_200(server_factory) -> None:
    gate = threading.Event()
    served = server_factory(gate=gate)
    assert error_of(httpx.get(f"{served.url}/health"), 503)["code"] == "not_ready"
    assert error_of(served.post("/v1/chat/completions", CHAT), 503)["code"] == "engine_loading"
    gate.set()
    wait_ready(served)
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_reward_failure_is_503_and_an_unexpected_one_is_a_generic_500(server_factory) -> None:
    class Broken(FakeScorer):
        async def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            raise RewardError("CUDA out of memory at 0xdeadbeef")

    class Buggy(FakeScorer):
        async def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("secret internal detail")

    served = server_factory(scorers={"fake": Broken(), "other": Buggy()})
    error = error_of(served.post("/v1/chat/completions", CHAT), 503)
    assert "deadbeef" not in error["message"]
    error = error_of(served.post("/v1/chat/completions", {**CHAT, "sbon": {"reward": "other"}}),
                     500)
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 1}}).status_code == 200


def test_an_api_key_guards_the_v1_routes(server_factory, caplog) -> None:
    served = server_factory(server={"api_key": "sk-local-42"})
    error = error_of(served.post("/v1/chat/completions", CHAT), 401)
    assert error["code"] == "invalid_api_key"
    wrong = served.post("/v1/chat/completions", CHAT, headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        served.client().models.list()  # the client sends "unused"
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="sk-local-42", max_retries=0)
    assert client.chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                          max_tokens=2).choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no key
    assert all("sk-local-42" not in str(vars(r)) for r in caplog.records)
