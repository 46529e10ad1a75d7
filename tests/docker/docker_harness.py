"""Helpers of the docker tier: docker commands, the README's commands, the container."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
README = REPO_ROOT / "README.md"
BUILD_TIMEOUT_S = 1800
HEALTHY_TIMEOUT_S = 600
MEASUREMENTS: dict[str, Any] = {}
"""What the tier measured (build time, image size, start and stop times), shown at the end."""


def docker(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def readme_command(prefix: str, needle: str) -> list[str]:
    """The README's shell command that starts with ``prefix`` and mentions ``needle``."""
    for line in README.read_text().splitlines():
        line = line.strip()
        if line.startswith(prefix) and needle in line:
            return shlex.split(line.split(" #")[0])
    raise AssertionError(f"the README has no '{prefix} ... {needle}' command")


@dataclass
class Image:
    tag: str
    build_s: float
    size_bytes: int


@dataclass
class Container:
    name: str
    image: Image
    started: float  # time.monotonic() at `docker run`
    healthy_s: float = 0.0
    stopped: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", "--format", "{{json .State}}",
                                      self.name).stdout))

    def python(self, script: str, *args: str, timeout: float = 600) -> Any:
        """Run a Python script inside the container; its stdout is one JSON value."""
        done = docker("exec", self.name, "python", "-c", script, *args, timeout=timeout)
        return json.loads(done.stdout)


HEALTH_SCRIPT = """
import json, urllib.request, urllib.error
try:
    status = urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=4).status
except urllib.error.HTTPError as exc:
    status = exc.code
except OSError:
    status = 0
print(json.dumps(status))
"""


def wait_healthy(container: Container) -> float:
    """Seconds from ``docker run`` until /health answers 200 inside the container."""
    deadline = container.started + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = container.state()
        if not state["Running"]:
            raise AssertionError(f"the container exited with {state['ExitCode']}:\n"
                                 f"{container.logs()[-6000:]}")
        done = docker("exec", container.name, "python", "-c", HEALTH_SCRIPT, check=False)
        if done.returncode == 0 and done.stdout.strip() == "200":
            return time.monotonic() - container.started
        time.sleep(1.0)
    raise AssertionError(f"not healthy after {HEALTHY_TIMEOUT_S} s:\n{container.logs()[-6000:]}")
