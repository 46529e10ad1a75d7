"""The start-up self-test over fakes, its wiring into start_runtime, and the environment the
CPU backend gives the engine (no compiler, no large /dev/shm needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBackend, FakeScorer

import engine.runtime as runtime_module
from common.config import AppConfig, load_config
from engine.backend import BackendError
from engine.selftest import (
    MAX_TOKENS,
    RESPONSE,
    SelfTestError,
    StartupError,
    check_compiler,
    describe,
    run_selftest,
)
from engine.types import Candidate
from engine.vllm_backend import engine_environment


def broken(_: str) -> float:
    raise RuntimeError("reward model weights are missing")


async def test_the_self_test_generates_a_few_tokens_and_scores_once_per_reward() -> None:
    backend = FakeBackend()
    scorers = {"a": FakeScorer(), "b": FakeScorer(fn=lambda r: 0.5, name="b")}
    report = await run_selftest(backend, scorers)
    (call,) = backend.calls
    assert call.n == 1 and call.max_tokens == MAX_TOKENS
    assert call.request_id.startswith("selftest-")
    assert [r for _, r in scorers["a"].seen] == [RESPONSE]
    assert [r for _, r in scorers["b"].seen] == [RESPONSE]
    assert set(report.scoring_s) == {"a", "b"}
    assert report.total_s >= report.generation_s >= 0


async def test_a_failing_reward_fails_the_self_test_naming_the_reward() -> None:
    scorers = {"ok": FakeScorer(), "judge": FakeScorer(fn=broken, name="judge")}
    with pytest.raises(SelfTestError) as raised:
        await run_selftest(FakeBackend(), scorers)
    message = str(raised.value)
    assert "reward 'judge'" in message and "weights are missing" in message
    assert "'ok'" not in message


@pytest.mark.parametrize("value", [math.nan, math.inf])
async def test_a_reward_that_returns_no_number_fails(value: float) -> None:
    with pytest.raises(SelfTestError, match=r"reward 'r'.*finite"):
        await run_selftest(FakeBackend(), {"r": FakeScorer(fn=lambda _: value, name="r")})


async def test_a_generation_without_log_probabilities_fails() -> None:
    def no_logprobs(call: Any, i: int) -> Candidate:
        return Candidate((5, 6), "w5 w6", None, "length")

    with pytest.raises(SelfTestError, match=r"engine could not generate.*log-probability"):
        await run_selftest(FakeBackend(script=no_logprobs), {"r": FakeScorer()})


async def test_an_engine_failure_names_the_underlying_cause() -> None:
    class DeadEngine(FakeBackend):
        async def generate(self, *args: Any, **kwargs: Any) -> list[Candidate]:
            try:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
            except RuntimeError as exc:
                raise BackendError("generation failed: EngineDeadError") from exc

    with pytest.raises(SelfTestError) as raised:
        await run_selftest(DeadEngine(), {"r": FakeScorer()})
    assert "EngineDeadError" in str(raised.value)
    assert "No working C++ compiler" in str(raised.value)


async def test_a_hanging_engine_fails_after_the_timeout() -> None:
    with pytest.raises(SelfTestError, match="TimeoutError"):
        await run_selftest(FakeBackend(delay_s=5), {"r": FakeScorer()}, timeout_s=0.05)


def test_describe_lists_the_causes_once() -> None:
    try:
        try:
            raise ValueError("inner")
        except ValueError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        assert describe(exc) == "RuntimeError: outer <- ValueError: inner"


class StartableBackend(FakeBackend):
    """A fake with the real backend's lifecycle, for start_runtime's wiring."""

    started: bool = False
    closed: bool = False

    def __init__(self, config: AppConfig) -> None:
        super().__init__()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "on_cpu", lambda: False)


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> list[StartableBackend]:
    """Every backend start_runtime makes (fakes with the real lifecycle)."""
    made: list[StartableBackend] = []

    def make(config: AppConfig) -> StartableBackend:
        made.append(StartableBackend(config))
        return made[-1]

    monkeypatch.setattr(runtime_module, "VLLMBackend", make)
    return made


@pytest.mark.usefixtures("off_cpu")
async def test_start_runtime_fails_and_closes_everything_when_a_reward_is_broken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[StartableBackend] = []
    scorers = {"judge": FakeScorer(name="judge"),
               "length": FakeScorer(fn=broken, name="length")}

    def make_backend(config: AppConfig) -> StartableBackend:
        made.append(StartableBackend(config))
        return made[-1]

    closed: list[str] = []

    async def close_scorer(self: FakeScorer) -> None:
        closed.append(self.name)

    monkeypatch.setattr(runtime_module, "VLLMBackend", make_backend)
    monkeypatch.setattr(runtime_module, "build_scorers", lambda *a, **k: scorers)
    monkeypatch.setattr(FakeScorer, "close", close_scorer)
    config = load_config(None, [], environ={})
    with pytest.raises(SelfTestError, match="reward 'length'"):
        await runtime_module.start_runtime(config)
    assert made[0].started and made[0].closed
    assert sorted(closed) == ["judge", "length"]


@pytest.mark.usefixtures("off_cpu")
async def test_start_runtime_returns_after_a_passing_self_test(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "VLLMBackend", StartableBackend)
    scorer = FakeScorer(name="judge")
    monkeypatch.setattr(runtime_module, "build_scorers", lambda *a, **k: {"judge": scorer})
    started = await runtime_module.start_runtime(load_config(None, [], environ={}))
    assert scorer.seen and len(started.backend.calls) == 1  # type: ignore[attr-defined]
    await started.close()


@pytest.mark.usefixtures("off_cpu")
async def test_a_reward_that_cannot_start_is_named(
        monkeypatch: pytest.MonkeyPatch, backends: list[StartableBackend]) -> None:
    class Unloadable(FakeScorer):
        async def start(self) -> None:
            raise OSError("no such model folder")

    monkeypatch.setattr(runtime_module, "build_scorers",
                        lambda *a, **k: {"judge": FakeScorer(), "rm": Unloadable(name="rm")})
    with pytest.raises(StartupError, match="reward 'rm' failed to start: OSError: no such"):
        await runtime_module.start_runtime(load_config(None, [], environ={}))
    assert backends[0].closed


def test_compile_without_a_compiler_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"no C\+\+ compiler.*'g\+\+'.*torch_compile: false"):
        check_compiler(True, {"PATH": str(tmp_path)})
    check_compiler(False, {"PATH": str(tmp_path)})  # compile off: nothing to build
    compiler = tmp_path / "my-cxx"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    check_compiler(True, {"PATH": str(tmp_path), "CXX": "my-cxx"})
    with pytest.raises(StartupError, match="'g\\+\\+' is not on PATH"):
        check_compiler(True, {"PATH": str(tmp_path)})


async def test_start_refuses_compile_without_a_compiler_before_the_engine_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        backends: list[StartableBackend]) -> None:
    monkeypatch.setattr(runtime_module, "on_cpu", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    config = load_config(None, ["engine.torch_compile=true"], environ={})
    with pytest.raises(StartupError, match="no C"):
        await runtime_module.start_runtime(config)
    assert not backends


def environment(*overrides: str, on_cpu: bool = True,
                environ: dict[str, str] | None = None) -> dict[str, str]:
    config = load_config(None, list(overrides), environ={})
    return engine_environment(config, on_cpu, environ or {})


def test_the_cpu_backend_needs_no_compiler_and_no_large_shared_memory() -> None:
    assert environment() == {"TORCHDYNAMO_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                             "OMP_WAIT_POLICY": "PASSIVE"}


def test_openmp_waits_passively_only_with_the_in_process_worker() -> None:
    assert environment(environ={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})[
        "OMP_WAIT_POLICY"] == "PASSIVE"  # the image sets the executor itself
    assert "OMP_WAIT_POLICY" not in environment("engine.tensor_parallel_size=2")
    assert "OMP_WAIT_POLICY" not in environment(environ={"OMP_WAIT_POLICY": "ACTIVE"})


def test_compile_can_be_kept_on_or_turned_off_anywhere() -> None:
    assert environment("engine.torch_compile=true")["TORCHDYNAMO_DISABLE"] == "0"
    assert environment("engine.torch_compile=false", on_cpu=False) == {
        "TORCHDYNAMO_DISABLE": "1"}
    # Compiled graphs (enforce_eager off) were asked for: leave vLLM's default.
    assert "TORCHDYNAMO_DISABLE" not in environment("engine.enforce_eager=false")
    # A value already in the environment wins over the default, not over the setting.
    assert "TORCHDYNAMO_DISABLE" not in environment(environ={"TORCHDYNAMO_DISABLE": "0"})
    assert environment("engine.torch_compile=true",
                       environ={"TORCHDYNAMO_DISABLE": "1"})["TORCHDYNAMO_DISABLE"] == "0"


def test_the_gpu_backend_is_left_alone() -> None:
    assert environment(on_cpu=False) == {}


@pytest.mark.parametrize("setting", ["engine.tensor_parallel_size=2",
                                     "engine.pipeline_parallel_size=2",
                                     "engine.distributed_executor_backend=mp",
                                     "engine.distributed_executor_backend=ray"])
def test_parallel_or_explicit_executors_keep_vllms_multiprocessing(setting: str) -> None:
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in environment(setting)


def test_an_explicit_multiprocessing_setting_wins() -> None:
    env = environment(environ={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and "OMP_WAIT_POLICY" not in env

