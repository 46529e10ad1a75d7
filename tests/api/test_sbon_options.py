"""The KL budget and step delimiters through the HTTP API: accepted, reported, refused."""

from __future__ import annotations

import math

import openai
import pytest
from api_harness import Served

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def test_a_kl_budget_reports_the_lambda_of_every_selection(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=3,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 4, "kl_budget": 0.2, "block_size": 2}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["kl_budget"] == 0.2 and sbon["lambda"] is None
    assert len(sbon["lambdas"]) == len(sbon["blocks"]) == 3
    for block, lam in zip(sbon["blocks"], sbon["lambdas"], strict=True):
        assert block["lambda"] == lam
        assert block["kl_from_uniform"] <= 0.2 + 1e-9
        if isinstance(lam, float) and 0 < lam < math.inf:
            assert block["kl_from_uniform"] == pytest.approx(0.2, abs=1e-6)
    assert sbon["kl_from_uniform"] <= 3 * 0.2 + 1e-9


def test_a_lambda_request_reports_it_for_every_selection(served: Served) -> None:
    reply = served.client().completions.create(
        model="fake-model", prompt="The sea", max_tokens=4,
        extra_body={"sbon": {"n": 2, "lambda": "inf"}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["lambda"] == "inf" and sbon["lambdas"] == ["inf"] and sbon["kl_budget"] is None


@pytest.mark.parametrize(("sbon", "param"), [
    ({"lambda": 1.0, "kl_budget": 0.5}, "sbon.kl_budget"),
    ({"kl_budget": -1}, "sbon.kl_budget"),
    ({"block_delimiter": "\n\n", "block_size": None}, "sbon.block_delimiter"),
    ({"block_delimiter": ""}, "sbon.block_delimiter"),
])
def test_settings_that_cannot_work_are_a_400_naming_them(served: Served, sbon: dict,
                                                          param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
            extra_body={"sbon": sbon})
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == param
    # The server still serves afterwards.
    assert served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=2).choices  # type: ignore[arg-type]


def test_a_step_delimiter_is_reported_in_the_sbon_object(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 2, "block_size": 2, "block_delimiter": "\n"}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["block_delimiter"] == "\n" and sbon["block_size"] == 2
