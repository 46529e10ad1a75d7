"""Configuration reaches vLLM's own engine arguments unchanged (parallelism included)."""

from __future__ import annotations

from common.config import load_config
from engine.vllm_backend import build_engine_args, engine_args_kwargs


def test_parallelism_and_executor_backend_reach_the_engine_arguments(tmp_path) -> None:
    config = load_config(None, [
        "engine.tensor_parallel_size=4", "engine.pipeline_parallel_size=2",
        "engine.distributed_executor_backend=ray", "engine.dtype=bfloat16",
        "engine.memory_fraction=0.55", "engine.max_model_len=8192", "engine.enforce_eager=false",
        "model.served_name=policy",
    ], environ={})
    args = build_engine_args(config, str(tmp_path))
    assert type(args).__name__ == "AsyncEngineArgs"
    assert args.tensor_parallel_size == 4
    assert args.pipeline_parallel_size == 2
    assert args.distributed_executor_backend == "ray"
    assert args.dtype == "bfloat16"
    assert args.gpu_memory_utilization == 0.55
    assert args.max_model_len == 8192
    assert args.enforce_eager is False
    assert args.model == str(tmp_path)
    assert args.enable_prefix_caching is True
    # The KL estimator needs the sampler's own log-probabilities.
    assert args.logprobs_mode == "processed_logprobs"


def test_extra_engine_arguments_pass_through() -> None:
    config = load_config(None, ["engine.extra_args={max_num_seqs: 7, swap_space: 1}"], environ={})
    kwargs = engine_args_kwargs(config, "m")
    assert kwargs["max_num_seqs"] == 7 and kwargs["swap_space"] == 1
    assert "distributed_executor_backend" not in kwargs  # vLLM chooses when not configured


def test_chunked_prefill_is_off_on_the_cpu_and_configurable(monkeypatch) -> None:
    import engine.vllm_backend as backend

    config = load_config(None, ["engine.max_model_len=4096"], environ={})
    monkeypatch.setattr(backend, "on_cpu", lambda: True)
    kwargs = engine_args_kwargs(config, "m")
    assert kwargs["enable_chunked_prefill"] is False
    assert kwargs["max_num_batched_tokens"] >= 4096  # every prompt fits one step
    monkeypatch.setattr(backend, "on_cpu", lambda: False)
    assert "enable_chunked_prefill" not in engine_args_kwargs(config, "m")  # vLLM decides
    forced = load_config(None, ["engine.enable_chunked_prefill=true"], environ={})
    monkeypatch.setattr(backend, "on_cpu", lambda: True)
    assert engine_args_kwargs(forced, "m")["enable_chunked_prefill"] is True


def test_kv_blocks_are_32_tokens_on_the_cpu_and_configurable(monkeypatch) -> None:
    import engine.vllm_backend as backend
    from common.config import VLLMRewardConfig
    from engine.vllm_pooling import pooling_engine_kwargs

    config = load_config(None, [], environ={})
    reward = VLLMRewardConfig(name="rm", type="vllm", model="m")
    monkeypatch.setattr(backend, "on_cpu", lambda: True)
    # Short shared prefixes are reusable only in whole blocks: 32 on the CPU backend.
    assert engine_args_kwargs(config, "m")["block_size"] == 32
    assert pooling_engine_kwargs(reward)["block_size"] == 32
    monkeypatch.setattr(backend, "on_cpu", lambda: False)
    assert "block_size" not in engine_args_kwargs(config, "m")  # vLLM's default on a GPU
    sized = load_config(None, ["engine.kv_block_size=64"], environ={})
    assert engine_args_kwargs(sized, "m")["block_size"] == 64
