"""The docker tier: the CPU image built and run exactly as the README says, in a container.

It needs a Docker daemon, about 5 GB of disk and a few minutes, so the default test run skips
it. Run it with ``scripts/test.sh -m docker`` (or set ``SBON_DOCKER_TESTS=1``).

Environment:
  SBON_DOCKER_PYTHON_IMAGE  base image, passed as ``--build-arg PYTHON_IMAGE`` (default: the
                            Dockerfile's official Python image)
  SBON_DOCKER_BUILD_ARGS    more ``docker build`` arguments, shell-quoted, e.g.
                            ``--network host --build-arg TORCH_INDEX=`` where builds need
                            the host's network or pip already finds the CPU torch wheel

Containers run with ``--network none`` besides the README's flags, so the tests talk to the
server from inside the container (``docker exec``), never through a published port.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_harness import (
    BUILD_TIMEOUT_S,
    HERE,
    MEASUREMENTS,
    REPO_ROOT,
    Container,
    Image,
    docker,
    readme_command,
    wait_healthy,
)


def docker_tier_selected(config: pytest.Config) -> bool:
    if os.environ.get("SBON_DOCKER_TESTS") == "1":
        return True
    return re.search(r"\bdocker\b", config.option.markexpr or "") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if docker_tier_selected(config):
        return
    skip = pytest.mark.skip(reason="the docker tier builds and runs images (Docker daemon, "
                                   "~5 GB, minutes): run it with -m docker")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASUREMENTS:
        terminalreporter.section("docker tier measurements")
        for key, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def docker_daemon() -> None:
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"the docker tier needs a running Docker daemon: {done.stderr.strip()}")


@pytest.fixture(scope="session")
def cpu_image(docker_daemon: None) -> Image:
    """The CPU image, built with the README's command (plus the environment's arguments)."""
    command = readme_command("docker build", "docker/Dockerfile.cpu")
    tag = command[command.index("-t") + 1]
    extra: list[str] = []
    if os.environ.get("SBON_DOCKER_PYTHON_IMAGE"):
        extra += ["--build-arg", f"PYTHON_IMAGE={os.environ['SBON_DOCKER_PYTHON_IMAGE']}"]
    extra += shlex.split(os.environ.get("SBON_DOCKER_BUILD_ARGS", ""))
    started = time.monotonic()
    done = subprocess.run([*command[:2], *extra, *command[2:]], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    build_s = time.monotonic() - started
    assert done.returncode == 0, f"the build failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    MEASUREMENTS["build_s"] = round(build_s, 1)
    MEASUREMENTS["image_size_gb"] = round(size / 1e9, 2)
    return Image(tag, build_s, size)


@pytest.fixture(scope="session")
def cpu_container(cpu_image: Image) -> Iterator[Container]:
    """The README's ``docker run`` of the CPU image, detached, with no network."""
    command = readme_command("docker run", cpu_image.tag)
    assert command[-1] == cpu_image.tag
    name = f"sbon-docker-tier-{uuid.uuid4().hex[:8]}"
    container = Container(name, cpu_image, started=time.monotonic())
    docker(*command[1:2], "-d", "--name", name, "--network", "none", *command[2:])
    try:
        container.healthy_s = wait_healthy(container)
        MEASUREMENTS["healthy_s"] = round(container.healthy_s, 1)
        yield container
    finally:
        if not container.stopped:
            print(container.logs()[-4000:])
        docker("rm", "-f", name, check=False)
