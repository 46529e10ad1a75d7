"""The CPU image's exact command, run outside a container: healthy, answers, stops cleanly.

ENTRYPOINT and CMD are read from docker/Dockerfile.cpu; only what a container provides is
mapped: the config file's path inside the image, the prepared model's folder (the test
cache), and a free port on the loopback interface instead of 0.0.0.0:8000.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from helpers import REPO_ROOT, free_port
from live_server import launch, sbon_command, stop, wait_healthy

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.cpu"
IMAGE_CONFIG = "/etc/sbon/config.yaml"


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the Dockerfile's last stage (exec form)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    entry = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)[-1]
    command = re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)[-1]
    return json.loads(entry) + json.loads(command)


def image_config_source() -> Path:
    """The repository file the Dockerfile copies to the image's config path."""
    source = re.search(rf"^COPY (\S+) {re.escape(IMAGE_CONFIG)}$", DOCKERFILE.read_text(),
                       re.MULTILINE)
    assert source, "the CPU image copies its configuration"
    return REPO_ROOT / source.group(1)


def test_the_cpu_image_command_serves_a_chat_completion(model_cache_dir: Path,
                                                        tmp_path: Path) -> None:
    command = image_command()
    assert command[:2] == ["sbon", "serve"]
    command = [*sbon_command(), *command[1:]]
    command = [str(image_config_source()) if part == IMAGE_CONFIG else part for part in command]
    port = free_port()
    env = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir),
               SBON_SERVER__HOST="127.0.0.1", SBON_SERVER__PORT=str(port),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # as the image's ENV sets them
    server = launch(command, port, env, tmp_path, tmp_path / "server.log")
    process = server.process
    try:
        wait_healthy(server.url, process, server.log)
        reply = server.client().chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=8,
            messages=[{"role": "user", "content": "Say hello."}],
            extra_body={"sbon": {"n": 2, "lambda": 0.5}})
        assert reply.choices[0].message.content
        assert reply.choices[0].model_extra["sbon"]["n"] == 2  # type: ignore[index]
    finally:
        code = stop(process)
    # uvicorn finishes its graceful shutdown, then re-raises the SIGTERM it caught: outside a
    # container the status is -SIGTERM; as a container's PID 1 (where a signal without a
    # handler does nothing) the same process exits with 0.
    assert code in (0, -signal.SIGTERM), server.log_tail()
    log = server.log.read_text(errors="replace")
    assert "Application shutdown complete" in log, server.log_tail()
    assert "Traceback" not in log, server.log_tail()
