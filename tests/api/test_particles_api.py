"""Particles through the HTTP API and the official client: reported per block, refused
where they cannot work (400 naming the parameter), streamed as one text."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from api_harness import Served

from server.datalog import read_log

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def test_a_particles_request_reports_ess_and_resampling_per_block(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=3,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 4, "block_size": 2, "particles": True,
                             "ess_threshold": 1.0, "lambda": 0.5}})
    sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
    assert sbon["particles"]["ess_threshold"] == 1.0
    blocks = sbon["blocks"]
    assert len(blocks) == 3 and all(isinstance(b["resampled"], bool) for b in blocks)
    assert sbon["particles"]["resamplings"] == sum(b["resampled"] for b in blocks)
    for block in blocks:
        assert 1.0 - 1e-9 <= block["ess"] <= 4 + 1e-9
        assert ("ancestors" in block) == block["resampled"]
    assert not blocks[-1]["resampled"]  # after the last block: the final draw instead
    again = served.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=6, seed=3,  # type: ignore[arg-type]
        extra_body={"sbon": {"n": 4, "block_size": 2, "particles": True,
                             "ess_threshold": 1.0, "lambda": 0.5}})
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_a_streamed_particles_request_sends_the_drawn_text(served: Served) -> None:
    options = {"n": 3, "block_size": 2, "particles": True, "lambda": 1.0}
    whole = served.client().completions.create(
        model="fake-model", prompt="The sea", max_tokens=5, seed=9,
        extra_body={"sbon": options})
    stream = served.client().completions.create(
        model="fake-model", prompt="The sea", max_tokens=5, seed=9, stream=True,
        extra_body={"sbon": options})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == whole.choices[0].text


@pytest.mark.parametrize(("sbon", "param"), [
    ({"particles": True}, "sbon.particles"),
    ({"particles": True, "block_size": None}, "sbon.particles"),
    ({"particles": True, "block_size": 2, "kl_budget": 0.3}, "sbon.kl_budget"),
    ({"particles": True, "block_size": 2, "normalize": "zscore"}, "sbon.normalize"),
    ({"particles": True, "block_size": 2, "ess_threshold": 0}, "sbon.ess_threshold"),
    ({"particles": True, "block_size": 2, "ess_threshold": 1.5}, "sbon.ess_threshold"),
    ({"particles": True, "block_size": 2, "ess_threshold": "half"}, "sbon.ess_threshold"),
    ({"block_size": 2, "ess_threshold": 0.5}, "sbon.ess_threshold"),
    ({"particles": "yes please", "block_size": 2}, "sbon.particles"),
])
def test_particles_settings_that_cannot_work_are_a_400(served: Served, sbon: dict,
                                                       param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
            extra_body={"sbon": sbon})
    body = refused.value.body
    assert refused.value.status_code == 400
    assert isinstance(body, dict) and body["param"] == param, body


def test_particles_requests_stay_out_of_the_distillation_log(
        server_factory: Callable[..., Served], tmp_path: Path) -> None:
    served = server_factory(datalog={"enabled": True, "dir": str(tmp_path),
                                     "flush_records": 1})
    for options in ({"n": 3, "block_size": 2, "particles": True}, {"n": 3, "block_size": 2}):
        response = served.post("/v1/completions", {
            "model": "fake-model", "prompt": "The sea", "max_tokens": 4, "sbon": options})
        assert response.status_code == 200
    deadline = time.monotonic() + 10
    records: list = []
    while time.monotonic() < deadline and not records:
        records = read_log(tmp_path).records if tmp_path.exists() else []
        time.sleep(0.01)
    time.sleep(0.2)  # a particles record, if one were written, would be there by now
    records = read_log(tmp_path).records
    assert len(records) == 1 and records[0]["settings"]["block_size"] == 2
    assert len(records[0]["blocks"]) == 2
