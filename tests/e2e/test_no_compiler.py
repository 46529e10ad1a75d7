"""A host without a C++ compiler: ``sbon serve`` still serves scored requests (the CPU
backend turns torch.compile off by default), and a configuration that needs the compiler
is refused at start, with exit status 1 and a message, instead of failing the first
request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from helpers import REPO_ROOT, free_port
from live_server import launch, sbon_command, stop, wait_healthy

COMPILERS = re.compile(r"^(.*-)?(cc|c\+\+|g\+\+|gcc|clang|clang\+\+|cpp|icx|icpx)(-[\d.]+)?$")
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


def path_without_compilers(bin_dir: Path) -> str:
    """A PATH of one folder linking every program of this PATH except C/C++ compilers."""
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if COMPILERS.match(entry.name) or target.exists():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_dir)


def environment(tmp_path: Path, model_cache_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CC", "CXX", "TORCHDYNAMO_DISABLE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(PATH=path_without_compilers(tmp_path / "bin"),
               SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1",
               SBON_ENGINE__MAX_MODEL_LEN="1024",
               # A fresh compile cache: nothing compiled earlier can stand in for a compiler.
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert not any(shutil.which(c, path=env["PATH"]) for c in ("g++", "c++", "cc", "gcc"))
    return env


def serve_command(port: int, *settings: str) -> list[str]:
    extra = [arg for setting in settings for arg in ("--set", setting)]
    return [*sbon_command(), "serve", "--config", str(REPO_ROOT / "config.yaml"),
            "--host", "127.0.0.1", "--port", str(port), *extra]


def test_scored_requests_need_no_compiler(model_cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = environment(tmp_path, model_cache_dir, port)
    server = launch(serve_command(port), port, env, tmp_path, tmp_path / "server.log")
    try:
        wait_healthy(server.url, server.process, server.log)
        client = server.client()
        for seed in (1, 2):  # the first request used to kill the engine
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=8, seed=seed,
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_body={"sbon": {"n": 2, "lambda": 0.5}})
            sbon = reply.choices[0].model_extra["sbon"]  # type: ignore[index]
            assert reply.choices[0].message.content and sbon["scored"]
            assert len(sbon["rewards"]) == 2
    finally:
        stop(server.process)
    assert "self-test passed" in server.log.read_text(errors="replace"), server.log_tail()


def test_compile_without_a_compiler_fails_at_start_with_a_message(
        model_cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = environment(tmp_path, model_cache_dir, port)
    server = launch(serve_command(port, "engine.torch_compile=true"), port, env, tmp_path,
                    tmp_path / "server.log")
    try:
        code = server.process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        stop(server.process)
        raise AssertionError(f"the server kept running:\n{server.log_tail()}") from None
    log = server.log.read_text(errors="replace")
    assert code == 1, server.log_tail()
    assert "no C++ compiler was found ('g++' is not on PATH)" in log, server.log_tail()
    assert "engine ready" not in log  # refused before the engine was built
