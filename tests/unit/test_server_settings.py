"""The server's settings: limits, an empty API key, exposure, and the deployment files'
security and shutdown settings against them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT
from pydantic import ValidationError

from common.config import AppConfig, Limits, ServerConfig, load_config

DOCKER = REPO_ROOT / "docker"


@pytest.mark.parametrize("environ", [{"SBON_SERVER__API_KEY": ""},
                                     {"SBON_SERVER__API_KEY": "   "},
                                     {"SBON_SERVER__API_KEY": "null"}])
def test_an_empty_api_key_is_a_configuration_error(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="SBON_SERVER__API_KEY is set but"):
        load_config(None, environ=environ)
    with pytest.raises(ValueError, match=r"--set server\.api_key is set but empty"):
        load_config(None, ["server.api_key="], environ={})
    with pytest.raises(ValidationError, match="api_key is empty"):
        ServerConfig(api_key="  ")


def test_an_api_key_from_the_environment_is_kept_secret() -> None:
    config = load_config(None, environ={"SBON_SERVER__API_KEY": "sk-1"})
    assert config.server.api_key is not None
    assert config.server.api_key.get_secret_value() == "sk-1"
    assert "sk-1" not in repr(config) and "sk-1" not in str(config.model_dump())


def test_limits_keep_one_largest_request_admissible() -> None:
    with pytest.raises(ValidationError, match="max_candidates_in_flight"):
        Limits(max_candidates=32, max_candidates_in_flight=16)
    with pytest.raises(ValidationError):
        Limits(request_timeout_s=0)
    assert Limits().max_candidates_in_flight >= Limits().max_candidates


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True), ("::1", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.7", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert ServerConfig(host=host).loopback is loopback


def kubernetes() -> dict[str, dict]:
    text = (DOCKER / "k8s" / "softbon-serve.yaml").read_text()
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def test_the_kubernetes_example_runs_unprivileged_on_a_read_only_root() -> None:
    pod = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/cache"} <= mounted  # what the server writes has somewhere to go
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["SBON_SERVER__API_KEY"]["valueFrom"]


def test_grace_periods_outlast_the_drain() -> None:
    docs = kubernetes()
    config = AppConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_s + 10
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in ("sbon", "sbon-gpu"):
        grace = compose["services"][name].get("stop_grace_period", "10s")
        assert _seconds(grace) > ServerConfig().drain_s + 10, name


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60}
    return float(text[:-1]) * units[text[-1]]


def test_shipped_configs_bind_as_documented() -> None:
    assert load_config(REPO_ROOT / "config.yaml", environ={}).server.loopback
    for path in sorted((DOCKER / "configs").glob("*.yaml")):
        assert isinstance(load_config(Path(path), environ={}).server.drain_s, float)
