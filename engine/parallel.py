"""What vLLM's parallel workers need before they start: CPU thread binding and head checks.

vLLM's CPU workers bind their OpenMP threads automatically only with one NUMA node per
worker, so a one-node machine fails tensor parallelism at start; the product splits the CPUs
it may use between the local ranks instead (``VLLM_CPU_OMP_THREADS_BIND``). A parallel size
that does not divide the model's attention heads fails early here, with the numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config import EngineConfig

BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


class ParallelConfigError(ValueError):
    """A parallel layout this model or this machine cannot run."""


def local_ranks(engine: EngineConfig) -> int:
    """Worker processes on this machine: tensor x pipeline parallel ranks."""
    return engine.tensor_parallel_size * engine.pipeline_parallel_size


def split_cpus(cpus: Sequence[int], ranks: int) -> list[list[int]]:
    """``cpus`` (sorted) in ``ranks`` contiguous groups of equal size; left-over CPUs stay
    free for the engine's own process (vLLM reserves some for its scheduler too)."""
    ordered = sorted(set(cpus))
    if ranks < 1:
        raise ParallelConfigError(f"parallel ranks must be at least 1, not {ranks}")
    per_rank = len(ordered) // ranks
    if per_rank == 0:
        raise ParallelConfigError(
            f"{ranks} parallel workers need at least {ranks} CPUs; this process may use "
            f"{len(ordered)} ({_id_list(ordered)}). Lower engine.tensor_parallel_size or "
            f"engine.pipeline_parallel_size, or set {BIND_VARIABLE} yourself"
        )
    return [ordered[i * per_rank:(i + 1) * per_rank] for i in range(ranks)]


def _id_list(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (vLLM's CPU-list syntax)."""
    parts: list[str] = []
    start = prev = None
    for cpu in sorted(cpus):
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def threads_bind(cpus: Sequence[int], ranks: int) -> str:
    """The ``VLLM_CPU_OMP_THREADS_BIND`` value: one CPU list per rank, ``|`` between."""
    return "|".join(_id_list(group) for group in split_cpus(cpus, ranks))


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parallel_environment(engine: EngineConfig, on_cpu: bool, environ: Mapping[str, str],
                         cpus: Sequence[int]) -> dict[str, str]:
    """Environment variables parallel CPU workers need beyond ``environ``.

    Only vLLM's multiprocessing executor binds threads (Ray workers take the threads Ray
    gives them), and a value the user set is kept as given.
    """
    ranks = local_ranks(engine)
    if (not on_cpu or ranks == 1 or BIND_VARIABLE in environ
            or engine.distributed_executor_backend not in (None, "mp")):
        return {}
    return {BIND_VARIABLE: threads_bind(cpus, ranks)}


def read_model_config(model_path: str) -> dict[str, Any] | None:
    """The model folder's ``config.json`` (the text model's part of a multimodal one), or
    None when ``model_path`` is not a local folder with one (vLLM then checks itself)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    text = data.get("text_config")
    return text if isinstance(text, dict) and "num_attention_heads" in text else data


def check_heads(engine: EngineConfig, model_config: Mapping[str, Any] | None) -> None:
    """Refuse a tensor parallel size that does not divide the attention or KV heads."""
    size = engine.tensor_parallel_size
    if size == 1 or model_config is None:
        return
    heads = model_config.get("num_attention_heads")
    kv_heads = model_config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        return
    if heads % size or (kv_heads % size and size % kv_heads):
        sizes = [d for d in range(1, heads + 1) if heads % d == 0
                 and (kv_heads % d == 0 or d % kv_heads == 0)]
        raise ParallelConfigError(
            f"engine.tensor_parallel_size={size} does not divide this model's heads "
            f"({heads} attention heads, {kv_heads} key-value heads); sizes that do: "
            f"{', '.join(map(str, sizes))}"
        )


def prepare_parallel(engine: EngineConfig, model_path: str, on_cpu: bool) -> dict[str, str]:
    """Check the layout against the model, and return the environment its workers need."""
    check_heads(engine, read_model_config(model_path))
    return parallel_environment(engine, on_cpu, os.environ, allowed_cpus())


def single_worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a one-worker engine (the ``vllm`` reward's) needs beside a parallel generator:
    a binding of several rank lists would fail vLLM's check that it has one list per
    worker, so that engine binds its one worker itself (``auto``)."""
    if "|" in environ.get(BIND_VARIABLE, ""):
        return {BIND_VARIABLE: "auto"}
    return {}


@contextmanager
def scoped_environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while an engine starts (vLLM reads them when it spawns
    its processes), the previous values afterwards, so a second engine is not bound by
    the first one's layout."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
