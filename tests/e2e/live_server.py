"""One real ``sbon serve`` process on the embedded model for the end-to-end tier.

The process is started exactly as a user starts it (the console entry point with the
repository's ``config.yaml``), on a free port, with the model prepared into the test cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from helpers import REPO_ROOT, free_port

START_TIMEOUT_S = 900


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=600)

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:]


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path,
                 timeout: float = START_TIMEOUT_S) -> None:
    """Poll /health until 200; fail at once with the log's tail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not healthy after {timeout} s:\n"
                       f"{log.read_text(errors='replace')[-4000:]}")


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, as a container runtime sends it; SIGKILL only if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def launch(command: list[str], port: int, env: dict[str, str], cwd: Path,
           log: Path) -> LiveServer:
    """Start a server process with its output in ``log``."""
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    return LiveServer(f"http://127.0.0.1:{port}", process, log)


def sbon_command() -> list[str]:
    installed = shutil.which("sbon", path=str(Path(sys.executable).parent))
    return [installed] if installed else [sys.executable, "-m", "cli.main"]


@pytest.fixture(scope="session")
def live_server(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LiveServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1",
               SBON_ENGINE__MAX_MODEL_LEN="1024", SBON_LIMITS__MAX_CONCURRENT_REQUESTS="4")
    command = [*sbon_command(), "serve", "--config", str(REPO_ROOT / "config.yaml"),
               "--host", "127.0.0.1", "--port", str(port)]
    server = launch(command, port, env, REPO_ROOT, log)
    try:
        wait_healthy(server.url, server.process, log)
        yield server
    finally:
        stop(server.process)
