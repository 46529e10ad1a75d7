"""Parallel worker preparation: CPU splits per rank, the user's binding kept, head checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import EngineConfig
from engine.parallel import (
    BIND_VARIABLE,
    ParallelConfigError,
    check_heads,
    parallel_environment,
    read_model_config,
    scoped_environment,
    single_worker_environment,
    split_cpus,
    threads_bind,
)


@pytest.mark.parametrize(("cpus", "ranks", "expected"), [
    ([0, 1], 2, "0|1"),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, "0-3|4-7"),
    ([3, 1, 2, 0], 2, "0-1|2-3"),
    ([0, 2, 4, 6, 8, 10], 3, "0,2|4,6|8,10"),
    ([0, 1, 2, 3, 4], 2, "0-1|2-3"),  # the odd CPU stays free for the engine process
    ([5], 1, "5"),
])
def test_threads_bind_splits_the_allowed_cpus_evenly(cpus: list[int], ranks: int,
                                                     expected: str) -> None:
    assert threads_bind(cpus, ranks) == expected


def test_groups_are_disjoint_and_equal_in_size() -> None:
    groups = split_cpus(list(range(13)), 4)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    flat = [cpu for g in groups for cpu in g]
    assert len(flat) == len(set(flat))


def test_more_ranks_than_cpus_is_refused_with_the_numbers() -> None:
    with pytest.raises(ParallelConfigError, match="2 parallel workers need at least 2 CPUs"):
        threads_bind([0], 2)


def engine(**fields: object) -> EngineConfig:
    return EngineConfig.model_validate(fields)


def test_parallel_cpu_workers_get_a_binding() -> None:
    env = parallel_environment(engine(tensor_parallel_size=2), True, {}, [0, 1])
    assert env == {BIND_VARIABLE: "0|1"}
    env = parallel_environment(engine(tensor_parallel_size=2, pipeline_parallel_size=2),
                               True, {}, list(range(8)))
    assert env == {BIND_VARIABLE: "0-1|2-3|4-5|6-7"}


@pytest.mark.parametrize(("fields", "on_cpu", "environ"), [
    ({"tensor_parallel_size": 2}, True, {BIND_VARIABLE: "0,1|2,3"}),  # the user's own
    ({"tensor_parallel_size": 2}, False, {}),  # GPUs: vLLM's own placement
    ({}, True, {}),  # one worker: vLLM binds it itself
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}, True, {}),
])
def test_no_binding_where_vllm_or_the_user_decides(fields: dict[str, object], on_cpu: bool,
                                                   environ: dict[str, str]) -> None:
    assert parallel_environment(engine(**fields), on_cpu, environ, [0, 1, 2, 3]) == {}


@pytest.mark.parametrize(("size", "heads", "kv_heads"), [
    (2, 4, 2), (4, 4, 2), (3, 9, 3), (8, 32, 8), (4, 32, 2), (1, 9, 3)])
def test_sizes_that_divide_the_heads_pass(size: int, heads: int, kv_heads: int) -> None:
    check_heads(engine(tensor_parallel_size=size),
                {"num_attention_heads": heads, "num_key_value_heads": kv_heads})


@pytest.mark.parametrize(("size", "heads", "kv_heads", "valid"), [
    (2, 9, 3, "1, 3, 9"),  # the embedded model
    (3, 4, 2, "1, 2, 4"),
    (3, 12, 4, "1, 2, 4, 12"),  # 3 divides the attention heads, not the 4 KV heads
])
def test_sizes_that_do_not_divide_the_heads_are_refused(size: int, heads: int,
                                                        kv_heads: int, valid: str) -> None:
    with pytest.raises(ParallelConfigError) as raised:
        check_heads(engine(tensor_parallel_size=size),
                    {"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    message = str(raised.value)
    assert f"tensor_parallel_size={size}" in message and f"{heads} attention heads" in message
    assert message.endswith(f"sizes that do: {valid}")


def test_the_model_config_is_read_from_the_folder(tmp_path: Path) -> None:
    assert read_model_config(str(tmp_path)) is None  # no folder config: vLLM decides
    assert read_model_config("org/some-hub-model") is None
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 2}}))
    assert read_model_config(str(tmp_path)) == {"num_attention_heads": 8,
                                                "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 6}))
    config = read_model_config(str(tmp_path))
    with pytest.raises(ParallelConfigError, match="6 attention heads, 6 key-value heads"):
        check_heads(engine(tensor_parallel_size=4), config)


def test_a_one_worker_engine_beside_a_bound_generator_binds_itself() -> None:
    assert single_worker_environment({BIND_VARIABLE: "0|1"}) == {BIND_VARIABLE: "auto"}
    assert single_worker_environment({BIND_VARIABLE: "0-3"}) == {}
    assert single_worker_environment({}) == {}


def test_the_scoped_environment_restores_what_was_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBON_TEST_KEPT", "before")
    monkeypatch.delenv("SBON_TEST_NEW", raising=False)
    with scoped_environment({"SBON_TEST_KEPT": "during", "SBON_TEST_NEW": "x"}):
        assert os.environ["SBON_TEST_KEPT"] == "during" and os.environ["SBON_TEST_NEW"] == "x"
    assert os.environ["SBON_TEST_KEPT"] == "before" and "SBON_TEST_NEW" not in os.environ
