"""The GPU check's planning: its server configuration validates, its steps, the memory
table from nvidia-smi, and the summary's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.gpucheck import (
    DEFAULT_POLICY,
    DEFAULT_REWARD,
    CheckSettings,
    bench_ratios,
    engine_memory,
    gpu_memory_by_process,
    name_engines,
    server_config,
    steps,
    summary,
)
from bench.gpucheck_run import main
from common.config import AppConfig


def test_the_server_configuration_is_a_valid_app_config_with_both_real_models() -> None:
    config = AppConfig.model_validate(server_config(CheckSettings()))
    assert config.model.name == DEFAULT_POLICY
    rewards = {r.name: r for r in config.rewards}
    assert rewards["rm"].type == "vllm" and rewards["rm"].model == DEFAULT_REWARD  # type: ignore[union-attr]
    assert {"judge", "length"} <= set(rewards)  # the integration tier's reward names
    assert config.sbon.n == 8 and config.default_reward == "rm"
    assert config.engine.memory_fraction + rewards["rm"].memory_fraction < 0.95  # type: ignore[union-attr]


def test_models_and_n_are_configurable() -> None:
    settings = CheckSettings(policy="org/p", reward="org/r", n=4)
    config = AppConfig.model_validate(server_config(settings))
    assert config.model.name == "org/p" and config.sbon.n == 4
    assert next(r for r in config.rewards if r.name == "rm").model == "org/r"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [{"n": 0}, {"port": 80}, {"policy": ""},
                                 {"policy_memory": 1.5}, {"colour": "red"}])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CheckSettings.model_validate(bad)


def test_a_memory_split_over_the_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="leave 5 %"):
        server_config(CheckSettings(policy_memory=0.7, reward_memory=0.3))


def test_the_steps_run_both_tiers_on_the_configuration_then_serve_and_bench(
        tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    plan = steps(CheckSettings(out=str(tmp_path), port=9000), "/py", config_path)
    assert [s.name for s in plan] == ["tier integration", "tier e2e", "server", "bench n=8"]
    for tier in plan[:2]:
        assert tier.env["SBON_TEST_CONFIG"] == str(config_path)
        assert tier.command[:3] == ("/py", "-m", "pytest")
    assert plan[2].command[-2:] == ("--config", str(config_path))
    bench = plan[3].command
    assert bench[bench.index("--n") + 1] == "8"
    assert bench[bench.index("--url") + 1] == "http://127.0.0.1:9000"


def test_plan_writes_the_configuration_and_prints_the_steps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = json.dumps({"out": str(tmp_path / "check"), "n": 2})
    assert main(["plan", "--settings", settings, "--python", "/py"]) == 0
    written = yaml.safe_load((tmp_path / "check" / "config.yaml").read_text())
    assert AppConfig.model_validate(written).sbon.n == 2
    printed = json.loads(capsys.readouterr().out)
    assert printed[-1]["name"] == "bench n=8"
    assert main(["plan", "--settings", json.dumps({"n": -1})]) == 2


def test_gpu_memory_is_read_per_process_and_named_per_engine() -> None:
    csv = "101, 900\n202, 10240\n303, 4096\n202, 10\nbad line\n"
    used = gpu_memory_by_process(csv)
    assert used == {101: 900.0, 202: 10250.0, 303: 4096.0}
    children = [(303, "VLLM::EngineCore", 20.0), (202, "VLLM::EngineCore", 10.0),
                (404, "python resource_tracker", 5.0)]
    engines = name_engines(children)
    assert engines == [("policy", 202), ("reward", 303)]
    assert engine_memory(used, [("server", 101), *engines]) == {
        "server": 900.0, "policy": 10250.0, "reward": 4096.0}


def test_the_summary_passes_only_when_every_step_passed() -> None:
    ratios = bench_ratios({"ratios": [{"method": "sbon", "concurrency": 1,
                                       "generated_tokens_per_s": 0.8123, "latency_p50": 1.31}]})
    text = summary({"tier integration": True, "bench n=8": True}, ratios,
                   {"policy": 2048.0}, CheckSettings())
    assert text.splitlines()[-1] == "PASS"
    assert "x0.812 of plain" in text and "policy     2.00 GiB" in text
    failed = summary({"tier integration": True, "tier e2e": False}, [], {}, CheckSettings())
    assert failed.splitlines()[-1] == "FAIL" and "tier e2e           FAILED" in failed
    assert summary({}, [], {}, CheckSettings()).endswith("FAIL")


def test_the_format_nvidia_smi_prints_is_read() -> None:
    # Captured from nvidia-smi 580 with a process holding 1 GiB and its child 2 GiB (plus
    # each one's CUDA context).
    assert gpu_memory_by_process("519, 1542\n541, 2566\n") == {519: 1542.0, 541: 2566.0}
    assert gpu_memory_by_process("") == {}
