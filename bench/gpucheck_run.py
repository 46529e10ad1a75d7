"""Running the GPU check's steps (``bench/gpucheck.py`` plans them; ``python -m
bench.gpucheck_run plan|run`` is the command): the test tiers, a live
server on the planned configuration, ``sbon bench`` against it, the GPU memory of each
engine, then the summary. Runs only on a machine with an NVIDIA GPU."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.gpucheck import (
    CheckSettings,
    Step,
    bench_ratios,
    engine_memory,
    gpu_memory_by_process,
    name_engines,
    summary,
    write_plan,
)

START_TIMEOUT_S = 1800  # first start downloads both models


def run_step(step: Step, log: Path) -> bool:
    print(f"[gpu-check] {step.name}: {' '.join(step.command)}", flush=True)
    with log.open("wb") as sink:
        done = subprocess.run(step.command, env={**os.environ, **step.env}, stdout=sink,
                              stderr=subprocess.STDOUT, check=False)
    print(f"[gpu-check] {step.name}: exit {done.returncode} (log: {log})", flush=True)
    return done.returncode == 0


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(2)
    return False


def measure_memory(server_pid: int) -> dict[str, float]:
    """MiB of GPU memory per engine process, and the server process's own (CUDA context
    and any in-process reward model)."""
    import psutil

    csv = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=False).stdout
    used = gpu_memory_by_process(csv)
    children = [(c.pid, " ".join([c.name(), *c.cmdline()[:1]]), c.create_time())
                for c in psutil.Process(server_pid).children(recursive=True)]
    engines = [("server", server_pid), *name_engines(children)]
    return engine_memory(used, engines)


def serve_and_bench(settings: CheckSettings, plan: Sequence[Step], out: Path
                    ) -> tuple[dict[str, bool], dict[str, float]]:
    serve, bench = plan[-2], plan[-1]
    url = f"http://127.0.0.1:{settings.port}"
    with (out / "server.log").open("wb") as sink:
        process = subprocess.Popen(serve.command, stdout=sink, stderr=subprocess.STDOUT)
    results: dict[str, bool] = {}
    memory: dict[str, float] = {}
    try:
        results["server start"] = wait_healthy(url, process)
        if results["server start"]:
            memory = measure_memory(process.pid)
            results[bench.name] = run_step(bench, out / "bench.log")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            results["server drain"] = process.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            results["server drain"] = False
    return results, memory


def run_plan(settings: CheckSettings, plan: Sequence[Step]) -> int:
    out = Path(settings.out)
    results = {step.name: run_step(step, out / f"{step.name.replace(' ', '-')}.log")
               for step in plan[:-2]}
    served, memory = serve_and_bench(settings, plan, out)
    results.update(served)
    bench_file = out / "bench" / "bench.json"
    ratios = bench_ratios(json.loads(bench_file.read_text())) if bench_file.is_file() else []
    text = summary(results, ratios, memory, settings)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if text.endswith("PASS") else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gpucheck_run plan|run --settings JSON``: write the configuration and
    the steps (plan), or also run them and print the summary (run)."""
    parser = argparse.ArgumentParser(prog="gpucheck")
    parser.add_argument("action", choices=["plan", "run"])
    parser.add_argument("--settings", default="{}", help="CheckSettings as JSON")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    try:
        settings = CheckSettings.model_validate_json(args.settings)
        _, plan = write_plan(settings, args.python)
    except ValueError as exc:
        print(f"gpucheck: error: {exc}", file=sys.stderr)
        return 2
    if args.action == "plan":
        print(json.dumps([{"name": s.name, "command": list(s.command)} for s in plan], indent=2))
        return 0
    return run_plan(settings, plan)


if __name__ == "__main__":
    raise SystemExit(main())
