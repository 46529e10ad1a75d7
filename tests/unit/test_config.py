"""Configuration loading: precedence, parsing of overrides, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError
from tests_paths import REPO_ROOT

from common.config import AppConfig, load_config, non_default_values

pytestmark = pytest.mark.unit


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
