"""The start-up self-test: prove the engine and every reward work before serving.

A process that starts but cannot answer is worse than one that stops: a container
orchestrator sees it healthy and sends it traffic. So before ``/health`` turns 200 the
runtime runs one tiny generation that asks for log-probabilities (the path every soft
best-of-n request takes) and one scoring call per configured reward on a fixed
prompt and response. A broken environment (a missing shared library, a kernel that needs a
C++ compiler the host lacks, a reward that cannot load its model) then fails the start with
a message that names the part that broke, and the server exits with status 1.

It costs a few engine steps: 2 generated tokens, plus one short scoring call per reward.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from common.prompts import Message, Prompt
from engine.backend import GenerationBackend
from engine.types import SamplingSettings
from reward.base import RewardScorer

logger = logging.getLogger(__name__)

PROMPT: Prompt = (Message("user", "Say hi."),)
RESPONSE = "Hi!"
MAX_TOKENS = 2
TIMEOUT_S = 600.0  # the first call may compile kernels (GPU graphs, CPU helpers)


class StartupError(RuntimeError):
    """The runtime cannot serve in this environment; the message says what to change."""


class SelfTestError(StartupError):
    """The engine or a reward failed the start-up self-test."""


def check_compiler(compile_on: bool, environ: Mapping[str, str]) -> None:
    """Refuse, before the engine starts, a CPU configuration that compiles with no compiler.

    On the CPU backend torch.compile (vLLM's helper kernels, and the model itself without
    ``enforce_eager``) builds C++ at run time with ``$CXX`` or ``g++``; without one the engine
    dies at its first log-probability request.
    """
    if not compile_on:
        return
    compiler = environ.get("CXX") or "g++"
    if shutil.which(compiler, path=environ.get("PATH")):
        return
    raise StartupError(
        f"torch.compile is on for the CPU backend (engine.torch_compile: true, "
        f"engine.enforce_eager: false or TORCHDYNAMO_DISABLE=0) and builds C++ kernels at run "
        f"time, but no C++ compiler was found ('{compiler}' is not on PATH). Install one or "
        f"set engine.torch_compile: false.")


@dataclass(frozen=True)
class SelfTestReport:
    """What the self-test measured, in seconds."""

    generation_s: float
    scoring_s: dict[str, float]

    @property
    def total_s(self) -> float:
        return self.generation_s + sum(self.scoring_s.values())


async def run_selftest(backend: GenerationBackend, scorers: Mapping[str, RewardScorer],
                       timeout_s: float = TIMEOUT_S,
                       skip: Collection[str] = ()) -> SelfTestReport:
    """Generate ``MAX_TOKENS`` tokens with log-probabilities, then score once per reward
    (except the rewards named in ``skip``: those configured with ``selftest: false``).

    Raises :class:`SelfTestError` naming what failed, with the underlying error's message.
    """
    started = time.perf_counter()
    try:
        await asyncio.wait_for(_generate(backend), timeout_s)
    except Exception as exc:
        raise SelfTestError(
            f"start-up self-test: the engine could not generate {MAX_TOKENS} tokens with "
            f"log-probabilities: {describe(exc)}") from exc
    generation_s = time.perf_counter() - started
    scoring_s: dict[str, float] = {}
    for name, scorer in scorers.items():
        if name in skip:
            logger.info("self-test skipped for a reward", extra={"reward": name})
            continue
        began = time.perf_counter()
        try:
            await asyncio.wait_for(_score(scorer), timeout_s)
        except Exception as exc:
            raise SelfTestError(
                f"start-up self-test: the reward '{name}' could not score a test response: "
                f"{describe(exc)}. A reward that only scores its own prompts (a task-specific "
                f"verifier) can skip this test: set 'selftest: false' on reward '{name}'"
            ) from exc
        scoring_s[name] = time.perf_counter() - began
    report = SelfTestReport(generation_s, scoring_s)
    logger.info("self-test passed", extra={
        "selftest_s": round(report.total_s, 3), "generation_s": round(generation_s, 3),
        "scoring_s": {k: round(v, 3) for k, v in scoring_s.items()}})
    return report


async def _generate(backend: GenerationBackend) -> None:
    ids = backend.encode_prompt(PROMPT)
    candidates = await backend.generate(ids, 1, SamplingSettings(max_tokens=MAX_TOKENS),
                                        MAX_TOKENS, f"selftest-{uuid.uuid4().hex}", 0)
    if len(candidates) != 1 or not candidates[0].token_ids:
        raise SelfTestError(f"expected one candidate with tokens, got {candidates!r}")
    logprob = candidates[0].cumulative_logprob
    if logprob is None or not math.isfinite(logprob):
        raise SelfTestError(f"expected a finite log-probability, got {logprob!r}")


async def _score(scorer: RewardScorer) -> None:
    values = await scorer.score([PROMPT], [RESPONSE])
    if len(values) != 1 or not math.isfinite(float(values[0])):
        raise SelfTestError(f"expected one finite reward, got {values!r}")


def describe(exc: BaseException) -> str:
    """The error and its causes, outermost first (an engine wraps the real cause)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current).strip().splitlines()
        parts.append(f"{type(current).__name__}: {text[0][:300]}" if text
                     else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(_dedupe(parts))


def _dedupe(parts: Sequence[str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part not in out:
            out.append(part)
    return out
