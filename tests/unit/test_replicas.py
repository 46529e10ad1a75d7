"""Ray Serve replica settings: bounds, deployment options, the replica header, the CLI."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cli.main import main
from common.config import AppConfig
from server.replicas import (
    REPLICA_HEADER,
    ReplicaHeader,
    ReplicaSettings,
    deployment_options,
    passed_environment,
)


def test_a_fixed_replica_count_and_the_servers_own_request_cap() -> None:
    config = AppConfig.model_validate({"limits": {"max_concurrent_requests": 6},
                                       "server": {"drain_s": 20}})
    options = deployment_options(config, ReplicaSettings(replicas=3, cpus_per_replica=2),
                                 {"HF_HUB_OFFLINE": "1", "SECRET": "x"})
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 6
    assert options["graceful_shutdown_timeout_s"] > 20
    actor = options["ray_actor_options"]
    assert actor["num_cpus"] == 2 and actor["num_gpus"] == 0
    assert actor["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"}


def test_autoscaling_on_requests_in_flight() -> None:
    settings = ReplicaSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
    options = deployment_options(AppConfig(), settings, {})
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                             "target_ongoing_requests": 2.0}


@pytest.mark.parametrize("bad", [
    {"replicas": 0}, {"replicas": 10_000}, {"min_replicas": 1},  # max_replicas missing
    {"min_replicas": 3, "max_replicas": 2}, {"target_ongoing_requests": 0},
    {"cpus_per_replica": 0}, {"gpus_per_replica": -1}, {"address": ""}, {"colour": 1}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ReplicaSettings.model_validate(bad)


@pytest.mark.parametrize(("argv", "named"), [
    (["--replicas", "0"], "--replicas"),
    (["--min-replicas", "3", "--max-replicas", "1"], "serve-ray"),
    (["--cpus-per-replica", "-1"], "--cpus-per-replica"),
])
def test_the_command_refuses_a_bad_option_by_name(argv: list[str], named: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-ray", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sbon: error: ") and named in error


def test_only_the_model_libraries_environment_reaches_the_replicas() -> None:
    passed = passed_environment({"HF_TOKEN": "t", "VLLM_CPU_KVCACHE_SPACE": "1",
                                 "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": "k",
                                 "PATH": "/bin"})
    assert passed == {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def test_every_http_response_names_its_replica() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def record(message: Any) -> None:
        sent.append(message)

    async def nothing() -> Any:
        return {}

    wrapped = ReplicaHeader(app, "abc123")
    asyncio.run(wrapped({"type": "http"}, nothing, record))
    assert (REPLICA_HEADER.encode(), b"abc123") in sent[0]["headers"]
    assert (b"content-type", b"text/plain") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b"ok"}


def test_the_application_builder_reads_the_config_file_and_the_settings() -> None:
    pytest.importorskip("ray.serve")
    from helpers import REPO_ROOT

    from server.replicas import app_builder

    application = app_builder({"config": str(REPO_ROOT / "config.yaml"), "replicas": 2})
    assert type(application).__name__ == "Application"
    with pytest.raises(ValueError):
        app_builder({"config": str(REPO_ROOT / "config.yaml"), "replicas": 0})
