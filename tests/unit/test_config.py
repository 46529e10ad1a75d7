"""Configuration loading: precedence, parsing of overrides, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from pydantic import ValidationError

from common.config import (
    AppConfig,
    HFRewardConfig,
    JudgeRewardConfig,
    PythonRewardConfig,
    load_config,
    non_default_values,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_shipped_config_file_is_valid_and_uses_the_embedded_model() -> None:
    config = load_config(REPO_ROOT / "config.yaml", environ={})
    assert config.model.name == "embedded"
    assert config.default_reward == "judge"
    assert config.reward_config("judge") is not None


def test_precedence_is_cli_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  dtype: bfloat16\n  max_model_len: 512\nsbon:\n  n: 3\n")
    env = {"SBON_ENGINE__DTYPE": "float16", "SBON_SBON__N": "5"}
    config = load_config(path, ["sbon.n=7"], environ=env)
    assert config.engine.dtype == "float16"  # env beats file
    assert config.sbon.n == 7  # CLI beats env
    assert config.engine.max_model_len == 512  # file beats default
    assert config.engine.tensor_parallel_size == 1  # default


def test_lambda_accepts_infinity_spellings(tmp_path: Path) -> None:
    for spelling in ("inf", "off", "Infinity"):
        assert math.isinf(load_config(None, [f"sbon.lambda={spelling}"], environ={}).sbon.lam)
    assert load_config(None, ["sbon.lambda=0"], environ={}).sbon.lam == 0.0


def test_invalid_values_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_config(None, ["engine.dtype=float8"], environ={})
    with pytest.raises(ValidationError):
        load_config(None, ["engine.unknown_key=1"], environ={})
    with pytest.raises(ValidationError):
        load_config(None, ["default_reward=missing"], environ={})
    with pytest.raises(ValueError):
        load_config(None, ["no-equals-sign"], environ={})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml", environ={})


def test_reward_entries_are_checked() -> None:
    with pytest.raises(ValidationError):
        AppConfig(rewards=[{"name": "r", "type": "hf"}])  # hf needs a model
    with pytest.raises(ValidationError):
        AppConfig(rewards=[{"name": "r", "type": "python", "function": "nocolon"}])
    with pytest.raises(ValidationError):
        AppConfig(rewards=[{"name": "a", "type": "judge"}, {"name": "a", "type": "judge"}])


def test_non_default_values_lists_only_changes() -> None:
    config = load_config(None, ["engine.dtype=bfloat16", "server.port=9000"], environ={})
    assert non_default_values(config) == {"engine.dtype": "bfloat16", "server.port": 9000}


REWARDS_FILE = """\
rewards:
  - name: rm
    type: hf
    model: first/model
  - name: rule
    type: python
    function: reward.rules:brevity
"""


def test_set_indexes_the_default_reward_list() -> None:
    config = load_config(None, ["rewards.0.yes_token=Oui", "rewards.0.no_token=Non"],
                         environ={})
    (reward,) = config.rewards
    assert isinstance(reward, JudgeRewardConfig)
    assert (reward.name, reward.yes_token, reward.no_token) == ("judge", "Oui", "Non")
    assert config.default_reward == "judge"


def test_set_of_a_field_the_default_reward_type_lacks_is_refused() -> None:
    # The default list holds the judge; ``model`` is an hf field, so it must not be dropped.
    with pytest.raises(ValidationError, match="model"):
        load_config(None, ["rewards.0.model=org/rm"], environ={})


def test_set_indexes_a_files_reward_list(tmp_path: Path) -> None:
    path = write(tmp_path, REWARDS_FILE)
    config = load_config(path, ["rewards.0.model=second/model",
                                "rewards.1.function=reward.rules:response_length"], environ={})
    first, second = config.rewards
    assert isinstance(first, HFRewardConfig) and first.model == "second/model"
    assert first.name == "rm" and first.device == "cpu"  # the rest of the entry is the file's
    assert isinstance(second, PythonRewardConfig)
    assert second.function == "reward.rules:response_length"


def test_the_environment_indexes_reward_lists_too(tmp_path: Path) -> None:
    path = write(tmp_path, REWARDS_FILE)
    config = load_config(path, environ={"SBON_REWARDS__0__MODEL": "env/model"})
    assert isinstance(config.rewards[0], HFRewardConfig)
    assert config.rewards[0].model == "env/model"


@pytest.mark.parametrize(("override", "message"), [
    ("rewards.2.model=x", "index 2 is outside a list of 2"),
    ("rewards.-3.model=x", "index -3 is outside a list of 2"),
    ("rewards.first.model=x", "'first' must be an index into a list"),
])
def test_a_bad_index_into_a_files_list_is_refused(tmp_path: Path, override: str,
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, REWARDS_FILE), [override], environ={})


def test_a_bad_index_into_the_default_list_is_refused() -> None:
    with pytest.raises(ValueError, match="index 1 is outside a list of 1"):
        load_config(None, ["rewards.1.model=x"], environ={})


def test_reward_entries_are_told_apart_by_type() -> None:
    config = AppConfig(rewards=[
        {"name": "a", "type": "judge"},
        {"name": "b", "type": "hf", "model": "org/rm"},
        {"name": "c", "type": "python", "function": "reward.rules:brevity"},
    ])
    assert [type(r) for r in config.rewards] == [JudgeRewardConfig, HFRewardConfig,
                                                  PythonRewardConfig]


def test_an_hf_reward_without_a_model_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"rewards\.0\.hf\.model"):
        AppConfig(rewards=[{"name": "r", "type": "hf"}])


@pytest.mark.parametrize("field", ["device", "model", "max_batch_tokens"])
def test_a_judge_reward_with_an_hf_only_field_is_refused(field: str) -> None:
    value = 1024 if field == "max_batch_tokens" else "cuda"
    with pytest.raises(ValidationError, match=field):
        AppConfig(rewards=[{"name": "r", "type": "judge", field: value}])


@pytest.mark.parametrize("entry", [
    {"name": "r"},  # no type
    {"name": "r", "type": "unknown"},
    {"name": "", "type": "judge"},
    {"name": "has space", "type": "judge"},
])
def test_a_reward_without_a_known_type_or_a_valid_name_is_refused(entry: dict) -> None:
    with pytest.raises(ValidationError):
        AppConfig(rewards=[entry])


@pytest.mark.parametrize("function", ["reward.rules:brevity", "pkg.sub.mod:_score", "m:f2"])
def test_a_python_reward_names_module_colon_function(function: str) -> None:
    (reward,) = AppConfig(rewards=[{"name": "r", "type": "python",
                                    "function": function}]).rewards
    assert isinstance(reward, PythonRewardConfig) and reward.function == function


@pytest.mark.parametrize("function", [
    "nocolon", "mod:", ":func", "mod:func:extra", "mod:1func", "1mod:func", "mod:fu-nc",
    "mod func:f",
])
def test_a_python_reward_function_of_another_form_is_refused(function: str) -> None:
    with pytest.raises(ValidationError, match="function"):
        AppConfig(rewards=[{"name": "r", "type": "python", "function": function}])
