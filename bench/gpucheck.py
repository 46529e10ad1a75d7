"""The plan and the summary of ``scripts/gpu-check.sh``: one command that checks a GPU machine.

``plan`` writes the server's configuration (a real policy and a real reward model on one GPU)
and lists the steps; ``run`` executes them (the test tiers, a live server, ``sbon bench`` at
n = 8) and ``summary`` prints one report: what passed, the ratios to plain n-sampling, and the
GPU memory each engine holds. Only the steps touch the GPU; the rest is tested anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_POLICY = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_REWARD = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
TIERS = ("integration", "e2e")


class CheckSettings(BaseModel):
    """What to check: the models, the server's port, the bench's size, the memory split."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(default=DEFAULT_POLICY, min_length=1)
    reward: str = Field(default=DEFAULT_REWARD, min_length=1)
    port: int = Field(default=8321, ge=1024, le=65535)
    n: int = Field(default=8, ge=1, le=64)
    prompts: int = Field(default=8, ge=1, le=256)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    max_model_len: int = Field(default=4096, ge=256, le=131072)
    # The two engines share the GPU: the policy's share and the reward engine's.
    policy_memory: float = Field(default=0.45, gt=0.0, lt=1.0)
    reward_memory: float = Field(default=0.25, gt=0.0, lt=1.0)
    out: str = "gpu-check"


def server_config(settings: CheckSettings) -> dict[str, Any]:
    """The server configuration under test: the policy in vLLM, the reward model in a
    second (pooling) vLLM engine, the judge and a rule-based reward beside them (the names
    the integration tier uses)."""
    if settings.policy_memory + settings.reward_memory >= 0.95:
        raise ValueError("policy_memory + reward_memory must leave 5 % of the GPU free")
    return {
        "model": {"name": settings.policy, "served_name": "gpu-check-policy"},
        "engine": {"dtype": "bfloat16", "max_model_len": settings.max_model_len,
                   "memory_fraction": settings.policy_memory, "enforce_eager": False},
        "rewards": [
            {"name": "rm", "type": "vllm", "model": settings.reward, "dtype": "bfloat16",
             "max_model_len": settings.max_model_len,
             "memory_fraction": settings.reward_memory, "enforce_eager": False},
            {"name": "judge", "type": "judge"},
            {"name": "length", "type": "python", "function": "reward.rules:response_length"},
        ],
        "default_reward": "rm",
        "sbon": {"n": settings.n, "lambda": 0.5},
        "limits": {"max_candidates": max(64, settings.n)},
        "server": {"host": "127.0.0.1", "port": settings.port, "log_json": False},
    }


@dataclass(frozen=True)
class Step:
    """One command of the check, with the environment it adds."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


def steps(settings: CheckSettings, python: str, config_path: Path) -> list[Step]:
    """The check's commands, in order; the server step starts and stops a live server."""
    out = Path(settings.out)
    test_env = {"SBON_TEST_CONFIG": str(config_path), "HF_HUB_OFFLINE": "0"}
    tiers = [Step(f"tier {tier}", (python, "-m", "pytest", f"tests/{tier}", "-m", tier, "-q",
                                   f"--junitxml={out / f'{tier}.xml'}"), test_env)
             for tier in TIERS]
    serve = Step("server", (python, "-m", "cli.main", "serve", "--config", str(config_path)))
    bench = Step("bench n=8", (
        python, "-m", "cli.main", "bench", "--config", str(config_path),
        "--url", f"http://127.0.0.1:{settings.port}", "--n", str(settings.n),
        "--prompts", str(settings.prompts), "--max-tokens", str(settings.max_tokens),
        "--concurrency", "1,4", "--out", str(out / "bench")))
    return [*tiers, serve, bench]


def gpu_memory_by_process(nvidia_smi_csv: str) -> dict[int, float]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``
    as {pid: MiB}."""
    used: dict[int, float] = {}
    for line in nvidia_smi_csv.strip().splitlines():
        pid, _, mib = (part.strip() for part in line.partition(","))
        if pid.isdigit() and mib.replace(".", "", 1).isdigit():
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
    return used


def engine_memory(used: Mapping[int, float], engines: Sequence[tuple[str, int]]
                  ) -> dict[str, float]:
    """MiB per engine: ``engines`` are (name, pid) of the processes that hold each one."""
    return {name: used.get(pid, 0.0) for name, pid in engines}


def bench_ratios(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Throughput and latency ratios to plain n-sampling from ``bench.json``."""
    return [{"method": r["method"], "concurrency": r["concurrency"],
             "throughput": round(float(r["generated_tokens_per_s"]), 3),
             "latency_p50": round(float(r["latency_p50"]), 3)}
            for r in report.get("ratios", [])]


def summary(results: Mapping[str, bool], ratios: Sequence[Mapping[str, Any]],
            memory: Mapping[str, float], settings: CheckSettings) -> str:
    """The one summary the script prints; the last line says PASS only if all passed."""
    lines = [f"GPU check: policy {settings.policy}, reward {settings.reward}, n = {settings.n}"]
    lines += [f"  {name:<18} {'passed' if ok else 'FAILED'}" for name, ok in results.items()]
    for r in ratios:
        lines.append(f"  {r['method']:<14} conc {r['concurrency']:<3} throughput x"
                     f"{r['throughput']:.3f} of plain, p50 latency x{r['latency_p50']:.3f}")
    lines += [f"  GPU memory {name:<10} {mib / 1024:.2f} GiB" for name, mib in memory.items()]
    ok = bool(results) and all(results.values())
    lines.append("PASS" if ok else "FAIL")
    return "\n".join(lines)


def name_engines(children: Sequence[tuple[int, str, float]]) -> list[tuple[str, int]]:
    """(name, pid) of each engine process among the server's children (pid, title, start
    time): vLLM's engine cores in start order, the policy's first, then the reward's."""
    cores = sorted((c for c in children if "EngineCore" in c[1]), key=lambda c: c[2])
    names = ["policy", "reward"] + [f"engine{i}" for i in range(2, len(cores))]
    return [(names[i], pid) for i, (pid, _, _) in enumerate(cores)]


def write_plan(settings: CheckSettings, python: str) -> tuple[Path, list[Step]]:
    """Write the server configuration into the output folder; return it and the steps."""
    import yaml

    out = Path(settings.out)
    config = server_config(settings)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, steps(settings, python, config_path)

