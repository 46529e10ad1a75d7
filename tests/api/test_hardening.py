"""Bad input and bad rewards at the API: numbers beyond what the engine takes, templates that
refuse a conversation, rewards that return what float() cannot take or cannot read a response
whole, and a stop string that is also the block delimiter: each a 400 naming the field or a
503 naming the reward, never a 500."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBackend, FakeScorer
from test_limits import CHAT, PROMPT, error_of
from tiny_models import build_tiny_reward_model

from common.config import AppConfig, PythonRewardConfig
from common.prompts import Prompt, prompt_as_text
from engine.vllm_backend import VLLMBackend
from reward.base import BlockQuery, Scores
from reward.python_fn import PythonScorer

ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.mark.parametrize(("field_name", "value"), [
    ("top_k", 18446744073709551616), ("top_k", 2**31), ("top_k", -2),
    ("seed", 2**63), ("seed", -1), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("temperature", 2.5), ("top_p", 0), ("max_tokens", 0), ("n", 0)])
def test_numbers_beyond_the_engines_bounds_are_400_naming_the_field(
        served, field_name: str, value: Any) -> None:
    for body in (CHAT, PROMPT):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        error = error_of(served.post(path, {**body, field_name: value}), 400)
        assert error["param"] == field_name


def test_the_largest_accepted_top_k_and_seed_are_served(served) -> None:
    response = served.post("/v1/chat/completions",
                           {**CHAT, "top_k": 2**31 - 1, "seed": 2**63 - 1})
    assert response.status_code == 200, response.text


@dataclass
class TemplatedBackend(FakeBackend):
    """The fake engine with the real backend's prompt rendering over a real tokenizer."""

    real: Any = None

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return list(self.real.encode_prompt(prompt))


@pytest.fixture(scope="module")
def alternating_backend(tmp_path_factory: pytest.TempPathFactory) -> TemplatedBackend:
    from transformers import AutoTokenizer

    folder = build_tiny_reward_model(tmp_path_factory.mktemp("alternating"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = ALTERNATING
    real = VLLMBackend(AppConfig())
    real._tokenizer = tokenizer
    return TemplatedBackend(model_name="fake-model", real=real)


def test_a_chat_template_that_refuses_the_messages_is_a_400(server_factory,
                                                             alternating_backend) -> None:
    served = server_factory(backend=alternating_backend)
    two_users = [{"role": "user", "content": "the sea"}, {"role": "user", "content": "calm"}]
    for stream in (False, True):
        error = error_of(served.post("/v1/chat/completions",
                                     {**CHAT, "messages": two_users, "stream": stream}), 400)
        assert error["param"] == "messages" and "alternate" in error["message"]
    assert served.post("/v1/chat/completions", CHAT).status_code == 200


def huge_reward(prompt: str, response: str) -> int:
    return 10**400


@pytest.mark.parametrize("isolation", ["threads", "process"])
def test_a_python_reward_float_cannot_take_is_a_503_naming_it(server_factory,
                                                               isolation: str) -> None:
    huge = PythonScorer(PythonRewardConfig(name="fake", type="python", isolation=isolation,
                                           function=f"{__name__}:huge_reward"))
    served = server_factory(scorers={"fake": huge, "other": FakeScorer(fn=len)})
    error = error_of(served.post("/v1/chat/completions", {**CHAT, "sbon": {"n": 2}}), 503)
    assert "'fake'" in error["message"] and error["param"] == "sbon.reward"
    assert served.post("/v1/chat/completions",
                       {**CHAT, "sbon": {"n": 2, "reward": "other"}}).status_code == 200


@dataclass
class LengthLimitedScorer(FakeScorer):
    """A model reward that reads responses of at most ``room`` tokens whole, and reports
    its prompt cut for prompts longer than ``prompt_chars``."""

    room: int = 8
    prompt_chars: int = 10
    blocks: list[int] = field(default_factory=list)

    def response_room(self) -> int | None:
        return self.room

    async def score_block(self, query: BlockQuery) -> Scores:
        rewards = await self.score([query.prompt] * len(query.block_texts), query.responses())
        return Scores(rewards, truncated=len(prompt_as_text(query.prompt)) > self.prompt_chars)

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return await super().score(prompts, responses)


def test_a_response_the_reward_cannot_read_whole_is_a_400_at_planning(server_factory) -> None:
    backend = FakeBackend(model_name="fake-model")
    served = server_factory(backend=backend, scorers={"fake": LengthLimitedScorer(room=8),
                                                      "other": FakeScorer(fn=len)})
    error = error_of(served.post("/v1/chat/completions",
                                 {**CHAT, "max_tokens": 9, "sbon": {"n": 2}}), 400)
    assert error["param"] == "max_tokens" and error["code"] == "reward_context_exceeded"
    assert "'fake'" in error["message"] and "8 tokens" in error["message"]
    chat = {**CHAT, "max_tokens": None, "max_completion_tokens": 9, "sbon": {"n": 2}}
    assert error_of(served.post("/v1/chat/completions", chat), 400)["param"] \
        == "max_completion_tokens"
    assert error_of(served.post("/v1/completions", {**PROMPT, "max_tokens": 9}), 400)
    assert not backend.calls  # refused before any generation
    assert served.post("/v1/chat/completions",
                       {**CHAT, "max_tokens": 8, "sbon": {"n": 2}}).status_code == 200
    # Another reward, or no scoring at all, has room.
    assert served.post("/v1/chat/completions", {**CHAT, "max_tokens": 9, "sbon": {
        "n": 2, "reward": "other"}}).status_code == 200
    assert served.post("/v1/chat/completions",
                       {**CHAT, "max_tokens": 9, "sbon": {"n": 1}}).status_code == 200


def test_a_cut_prompt_is_reported_in_the_sbon_object(server_factory) -> None:
    served = server_factory(scorers={"fake": LengthLimitedScorer(room=64, prompt_chars=40),
                                     "other": FakeScorer(fn=len)})
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "a long question " * 4}]}
    for body, truncated in ((long_chat, True), (CHAT, False)):
        for sbon in ({"n": 2}, {"n": 2, "block_size": 2}):
            reply = served.post("/v1/chat/completions", {**body, "sbon": sbon}).json()
            info = reply["choices"][0]["sbon"]
            assert info.get("reward_truncated") is (True if truncated else None)
            assert ("reward_truncated" in info) is truncated  # left out when false


@pytest.mark.parametrize("where", ["request", "config"])
def test_a_stop_string_equal_to_the_block_delimiter_is_a_400(server_factory,
                                                             where: str) -> None:
    sbon_config = {"block_delimiter": "\n\n"} if where == "config" else {}
    served = server_factory(sbon=sbon_config)
    options = {"n": 2, "block_size": 4}
    if where == "request":
        options["block_delimiter"] = "\n\n"
    for stop in ("\n\n", ["END", "\n\n"]):
        error = error_of(served.post("/v1/chat/completions",
                                     {**CHAT, "stop": stop, "sbon": options}), 400)
        assert error["param"] == "stop" and "block delimiter" in error["message"]
    assert served.post("/v1/chat/completions",
                       {**CHAT, "stop": "\n", "sbon": options}).status_code == 200


def test_the_load_test_reads_its_key_from_a_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    from helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("loadtest",
                                                  REPO_ROOT / "scripts" / "loadtest.py")
    assert spec is not None and spec.loader is not None
    loadtest = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "loadtest", loadtest)
    spec.loader.exec_module(loadtest)
    key_file = tmp_path / "key"
    key_file.write_text("#a-key with spaces-0123456789\n")
    args = loadtest.parse_args(["--api-key-file", str(key_file)])
    assert args.api_key == "#a-key with spaces-0123456789"
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--api-key-file", str(tmp_path / "absent")])
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--api-key", "k", "--api-key-file", str(key_file)])
