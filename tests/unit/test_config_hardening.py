"""Settings that must not silently change: overrides read by their declared type, the API
key from a file, the start-up warnings, and what the start-up log leaves out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.config import AppConfig, config_warnings, load_config, non_default_values
from common.overrides import OverrideError

HF_REWARD = {"name": "rm", "type": "hf", "model": "some/model"}


def _key(config: AppConfig) -> str | None:
    key = config.server.api_key
    return None if key is None else key.get_secret_value()


@pytest.mark.parametrize("text", ["#s3cret-key-0123456789", "abc #def", "123456", "true",
                                  "[1, 2]", "{a: b}", "0x1F", "~user"])
def test_a_secret_is_the_text_given(text: str) -> None:
    assert _key(load_config(None, environ={"SBON_SERVER__API_KEY": text})) == text
    assert _key(load_config(None, [f"server.api_key={text}"], environ={})) == text


@pytest.mark.parametrize("text", ["", " ", "null", "~", "NULL"])
def test_a_present_but_empty_or_null_key_names_its_source(text: str) -> None:
    with pytest.raises(OverrideError, match="SBON_SERVER__API_KEY is set but"):
        load_config(None, environ={"SBON_SERVER__API_KEY": text})
    with pytest.raises(OverrideError, match=r"--set server\.api_key is set but"):
        load_config(None, [f"server.api_key={text}"], environ={})


def test_string_fields_stay_strings_and_typed_fields_keep_yaml_rules(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("rewards:\n  - {name: rm, type: hf, model: some/model}\n")
    config = load_config(path, [
        "rewards.0.revision=0123", "rewards.0.model=org/#model", "model.served_name=007",
        "rewards.0.label=2", "server.port=8080", "engine.extra_args={max_logprobs: 3}",
        "sbon.lambda=inf", "sbon.block_size=null", "model.revision=null"], environ={
        "SBON_SBON__BLOCK_DELIMITER": "# step", "SBON_ENGINE__ENFORCE_EAGER": "false"})
    reward = config.rewards[0]
    assert reward.type == "hf"
    assert (reward.revision, reward.model, reward.label) == ("0123", "org/#model", 2)
    assert config.model.served_name == "007" and config.model.revision is None
    assert config.server.port == 8080 and config.engine.extra_args == {"max_logprobs": 3}
    assert config.sbon.lam == float("inf") and config.sbon.block_size is None
    assert config.sbon.block_delimiter == "# step" and config.engine.enforce_eager is False
    named = load_config(path, ["rewards.0.label=good"], environ={})
    assert named.rewards[0].label == "good"  # type: ignore[union-attr]


def test_free_mappings_keep_text_with_a_hash() -> None:
    config = load_config(None, ["engine.extra_args.hf_token=#tok en", "engine.extra_args.k=3"],
                         environ={"SBON_ENGINE__EXTRA_ARGS__OTHER": "a #b"})
    assert config.engine.extra_args == {"hf_token": "#tok en", "k": 3, "other": "a #b"}


def test_the_key_comes_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("#long-secret key-0123456789\n")
    config = load_config(None, [f"server.api_key_file={key_file}"], environ={})
    assert _key(config) == "#long-secret key-0123456789"
    assert "long-secret" not in str(non_default_values(config))
    key_file.write_text("sk-with-crlf-0123456789\r\n")
    assert _key(load_config(None, environ={"SBON_SERVER__API_KEY_FILE": str(key_file)})) \
        == "sk-with-crlf-0123456789"


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"), ("\n", "is empty"), ("", "is empty"), (b"\xff\xfe\x00", "cannot read")])
def test_a_bad_key_file_is_a_clear_error(tmp_path: Path, content: str | bytes | None,
                                         message: str) -> None:
    key_file = tmp_path / "key"
    if isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    with pytest.raises(ValueError, match=f"api_key_file.*{message}"):
        load_config(None, [f"server.api_key_file={key_file}"], environ={})


def test_a_key_and_a_key_file_exclude_each_other(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("a-key-of-sufficient-length")
    with pytest.raises(ValueError, match="both set"):
        load_config(None, [f"server.api_key_file={key_file}"],
                    environ={"SBON_SERVER__API_KEY": "another-key-of-length"})


def test_warnings_for_short_keys_unpinned_remote_code_and_short_rewards() -> None:
    assert config_warnings(AppConfig()) == []
    long_key = load_config(None, environ={"SBON_SERVER__API_KEY": "k" * 16})
    assert config_warnings(long_key) == []
    short = load_config(None, environ={"SBON_SERVER__API_KEY": "k" * 15})
    assert any("shorter than 16" in w for w in config_warnings(short))
    risky = AppConfig.model_validate({
        "model": {"trust_remote_code": True},
        "engine": {"max_model_len": 8192},
        "rewards": [HF_REWARD | {"trust_remote_code": True, "revision": "abc"},
                    {"name": "v", "type": "vllm", "model": "m", "trust_remote_code": True,
                     "max_model_len": 8192}]})
    warnings = config_warnings(risky)
    assert sum("trust_remote_code" in w for w in warnings) == 2  # the model and 'v'
    assert any(w.startswith("model:") for w in warnings)
    assert any("rewards 'v'" in w for w in warnings)
    short_reward = [w for w in warnings if "engine.max_model_len" in w]
    assert len(short_reward) == 1 and "'rm' reads at most 2048" in short_reward[0]


def test_warnings_reach_the_start_up_log(caplog: pytest.LogCaptureFixture) -> None:
    from server.lifecycle import warn_if_exposed

    config = load_config(None, environ={"SBON_SERVER__API_KEY": "short"})
    with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
        warn_if_exposed(config)
    assert any("shorter than 16" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage() == "short" for r in caplog.records)


def test_extra_args_are_not_logged() -> None:
    config = AppConfig.model_validate({
        "engine": {"extra_args": {"hf_token": "hf_secret_token"}},
        "rewards": [{"name": "v", "type": "vllm", "model": "m",
                     "extra_args": {"hf_overrides": "reward_secret"}}]})
    shown = str(non_default_values(config))
    assert "hf_secret_token" not in shown and "reward_secret" not in shown
    assert "hf_token" in shown and "hf_overrides" in shown
