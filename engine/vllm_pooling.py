"""A second in-process vLLM engine in pooling mode, for reward models served by vLLM.

The reward model (a sequence classifier) runs beside the generator: started after it, with
its own memory share, prefix caching on, and token-id inputs, so the conversation's shared
part (the prompt and, in blockwise mode, the earlier blocks) comes from its prefix cache.
With ``engine/vllm_backend.py`` the only modules that import vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

from common.config import VLLMRewardConfig
from engine.backend import BackendError
from engine.parallel import scoped_environment, single_worker_environment
from engine.vllm_backend import kv_block_size, on_cpu, prefill_tokens
from reward.vllm_reward import Classified

logger = logging.getLogger(__name__)


def pooling_engine_kwargs(config: VLLMRewardConfig) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments of the reward model's engine."""
    kwargs: dict[str, Any] = {
        "model": config.model,
        "runner": "pooling",
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": config.memory_fraction,
        "enforce_eager": config.enforce_eager,
        "enable_prefix_caching": True,
        "trust_remote_code": config.trust_remote_code,
        "disable_log_stats": True,
    }
    if config.revision:
        kwargs["revision"] = config.revision
    block_size = kv_block_size(config.kv_block_size)
    if block_size:
        kwargs["block_size"] = block_size
    if on_cpu():
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = config.max_model_len
    kwargs.update(config.extra_args)
    return kwargs


class PoolingEngine:
    """Raw classifier logits of token-id inputs, with prefill accounting."""

    def __init__(self, config: VLLMRewardConfig) -> None:
        self._config = config
        self._engine: Any = None
        self.tokenizer: Any = None
        self.num_labels = 1
        self.label2id: dict[str, int] = {}
        self.max_model_len = config.max_model_len

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if on_cpu():
            # The CPU backend reads its KV cache size when an engine starts.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self._config.kv_cache_gib)))
        args = AsyncEngineArgs(**pooling_engine_kwargs(self._config))
        # In a worker thread: the engine takes tens of seconds to build, and the event loop
        # must keep answering /health and SIGTERM meanwhile (as for the generator).
        with scoped_environment(single_worker_environment(os.environ)):
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.tokenizer = self._engine.get_tokenizer()
        hf_config = self._engine.model_config.hf_config
        self.num_labels = int(getattr(hf_config, "num_labels", 1))
        self.label2id = {str(k): int(v) for k, v in (getattr(hf_config, "label2id", None)
                                                      or {}).items()}
        logger.info("reward engine ready", extra={"reward_model": self._config.model})

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def reset_prefix_cache(self) -> bool:
        """Drop the cached prefixes (between benchmark methods)."""
        if self._engine is None:
            return False
        return bool(await self._engine.reset_prefix_cache())

    @property
    def healthy(self) -> bool:
        """Started, and vLLM has not reported the engine errored (its core process died)."""
        return self._engine is not None and not self._engine.errored

    async def classify(self, token_ids: Sequence[int]) -> Classified:
        """The raw logits (no activation) of one input, and its prefill accounting."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise BackendError("the reward engine is not started")
        params = PoolingParams(task="classify", use_activation=False)
        final = None
        try:
            async for output in self._engine.encode(
                    TokensPrompt(prompt_token_ids=list(token_ids)), params,
                    f"reward-{uuid.uuid4().hex}"):
                final = output
        except Exception as exc:  # vLLM's own error types; the scorer reports a reward error
            raise BackendError(f"reward scoring failed: {type(exc).__name__}") from exc
        if final is None:
            raise BackendError("the reward engine returned no output")
        logits = [float(v) for v in final.outputs.data.flatten().tolist()]
        prefill = prefill_tokens(len(token_ids), final.num_cached_tokens)
        return Classified(logits, prefill.computed, prefill.cached)
