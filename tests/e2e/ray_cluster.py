"""A local Ray head for the end-to-end tier: 127.0.0.1 only, its own temporary folder, and
ended with its whole process group (no ``ray stop``, which would stop every Ray session)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import free_port


def ray_command() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert found, "the ray command comes with the ray extra (scripts/install.sh installs it)"
    return found


@contextmanager
def local_ray_head(folder: Path, cpus: int) -> Iterator[str]:
    """Start a head with ``cpus`` CPUs; yield its address once ``ray status`` answers."""
    ray = ray_command()
    port = free_port()
    log = folder / "ray-head.log"
    # Ray's session folders hold sockets, whose paths must stay short.
    temp = Path("/tmp") / f"sbon-ray-{os.getpid()}-{port}"
    with log.open("wb") as sink:
        head = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--num-cpus={cpus}",
             "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={temp}"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True,
                             timeout=120).returncode != 0:
            assert head.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
