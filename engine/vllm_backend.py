"""The vLLM generation backend: vLLM's async engine, in-process.

This is the only module that imports vLLM. One soft best-of-n step is one vLLM request with
``n`` samples, so the prompt's KV cache is computed once and shared; prefix caching makes
block k+1 of a blockwise request prefill only the tokens of block k. The same engine also
answers the judge reward's next-token queries, so no second copy of the weights is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from common.config import AppConfig
from common.prompts import Prompt, chat_messages, prompt_as_text
from engine.backend import BackendError, InvalidGenerationRequest, PromptTooLongError
from engine.model_prep import resolve_model_path
from engine.types import Candidate, SamplingSettings

logger = logging.getLogger(__name__)


def engine_args_kwargs(config: AppConfig, model_path: str) -> dict[str, Any]:
    """Map the configuration to vLLM ``AsyncEngineArgs`` keyword arguments.

    Parallelism (tensor, pipeline, data) and the distributed executor backend (Ray for
    several machines) are vLLM's own: they pass through unchanged.
    """
    engine = config.engine
    kwargs: dict[str, Any] = {
        "model": model_path,
        "served_model_name": config.model.public_name,
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.memory_fraction,
        "enforce_eager": engine.enforce_eager,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "data_parallel_size": engine.data_parallel_size,
        "seed": engine.seed,
        "trust_remote_code": config.model.trust_remote_code,
        # The KL estimator needs the log-probabilities of the distribution actually
        # sampled (after temperature and top-p), not the raw model's (docs/maths.md,
        # "The KL estimator").
        "logprobs_mode": "processed_logprobs",
        "disable_log_stats": True,
    }
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if engine.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = engine.distributed_executor_backend
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    chunked = engine.enable_chunked_prefill
    if chunked is None and _on_cpu():
        # vLLM's CPU worker cannot rewind a seeded request's random generator after a partial
        # prefill ("CPU Generator does not use offset"): the engine dies as soon as a seeded
        # request's prompt is split across steps under load. Whole prefills avoid it.
        chunked = False
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    if chunked is False:
        # Without chunking every prompt must fit in one step.
        kwargs["max_num_batched_tokens"] = max(engine.max_num_batched_tokens or 0,
                                               engine.max_model_len)
    kwargs.update(engine.extra_args)
    return kwargs


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def build_engine_args(config: AppConfig, model_path: str) -> Any:
    """The ``AsyncEngineArgs`` object for this configuration."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(**engine_args_kwargs(config, model_path))


def _apply_cpu_kv_cache(config: AppConfig) -> None:
    # vLLM's CPU backend reads its KV cache size (GiB) from the environment at start.
    if config.engine.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(config.engine.kv_cache_gib)))


class VLLMBackend:
    """:class:`engine.backend.GenerationBackend` over ``vllm.v1.engine.async_llm.AsyncLLM``."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._engine: Any = None
        self._tokenizer: Any = None
        self.model_name = config.model.public_name
        self.max_model_len = config.engine.max_model_len
        self.model_path = ""

    async def start(self) -> None:
        """Prepare the model folder (embedded default) and start the engine."""
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_path = await asyncio.to_thread(resolve_model_path, self._config.model)
        _apply_cpu_kv_cache(self._config)
        args = build_engine_args(self._config, self.model_path)
        self._engine = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._engine.get_tokenizer()
        logger.info("engine ready", extra={"model": self.model_name})

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BackendError("the engine is not started")
        return self._tokenizer

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        if getattr(tokenizer, "chat_template", None) is None:
            return list(tokenizer.encode(prompt_as_text(prompt) + "\nassistant:"))
        messages = chat_messages(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def num_unfinished_requests(self) -> int:
        if self._engine is None:
            return 0
        return int(self._engine.get_num_unfinished_requests())

    def _check_length(self, prompt_len: int) -> None:
        if prompt_len + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len} tokens"
            )

    def _sampling_params(self, prompt_len: int, n: int, sampling: SamplingSettings,
                         max_tokens: int, seed: int | None, delta: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise BackendError("the engine is not started")
        self._check_length(prompt_len)
        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            max_tokens=min(max_tokens, self.max_model_len - prompt_len),
            stop=list(sampling.stop) or None,
            seed=seed,
            logprobs=0,  # the sampled token's log-probability gives the cumulative one
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def _outputs(self, prompt_token_ids: Sequence[int], params: Any,
                       request_id: str) -> AsyncIterator[Any]:
        """The engine's outputs for one request, with its errors mapped to ours."""
        from vllm.inputs import TokensPrompt

        try:
            async for output in self._engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params, request_id
            ):
                yield output
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # vLLM raises its own types; the server maps ours
            from vllm.exceptions import VLLMClientError

            if isinstance(exc, VLLMClientError):
                raise InvalidGenerationRequest(str(exc)) from exc
            raise BackendError(f"generation failed: {type(exc).__name__}") from exc

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: str,
        seed: int | None,
    ) -> list[Candidate]:
        params = self._sampling_params(len(prompt_token_ids), n, sampling, max_tokens, seed,
                                       delta=False)
        final = None
        async for output in self._outputs(prompt_token_ids, params, request_id):
            final = output
        if final is None:
            raise BackendError("the engine returned no output")
        return [_candidate(o) for o in sorted(final.outputs, key=lambda o: o.index)]

    async def generate_stream(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: str,
        seed: int | None,
    ) -> AsyncIterator[str | Candidate]:
        params = self._sampling_params(len(prompt_token_ids), 1, sampling, max_tokens, seed,
                                       delta=True)
        token_ids: list[int] = []
        text: list[str] = []
        last = None
        async for output in self._outputs(prompt_token_ids, params, request_id):
            last = output.outputs[0]
            token_ids.extend(last.token_ids)
            if last.text:
                text.append(last.text)
                yield last.text
        if last is None:
            raise BackendError("the engine returned no output")
        yield Candidate(tuple(token_ids), "".join(text), last.cumulative_logprob,
                        last.finish_reason, last.stop_reason)

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's cached prefixes (used between benchmark methods)."""
        if self._engine is None:
            return False
        return bool(await self._engine.reset_prefix_cache())

    async def label_logprobs(self, prompt: Prompt, labels: Sequence[str]) -> list[float]:
        """Log-probabilities of each label's first token as the model's next token.

        Used by the judge reward: the prompt is rendered with the chat template and the
        engine returns the log-probabilities of exactly these token ids.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise BackendError("the engine is not started")
        token_ids = [self._label_token(label) for label in labels]
        ids = self.encode_prompt(prompt)
        if len(ids) + 1 > self.max_model_len:
            ids = ids[-(self.max_model_len - 1) :]
        params = SamplingParams(
            n=1,
            max_tokens=1,
            temperature=1.0,
            logprob_token_ids=token_ids,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in self._engine.generate(
            TokensPrompt(prompt_token_ids=ids), params, f"judge-{uuid.uuid4().hex}"
        ):
            final = output
        if final is None or not final.outputs[0].logprobs:
            raise BackendError("the engine returned no log-probabilities")
        step = final.outputs[0].logprobs[0]
        return [float(step[t].logprob) for t in token_ids]

    def _label_token(self, label: str) -> int:
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the label '{label}' encodes to no token")
        return int(ids[0])


def _candidate(output: Any) -> Candidate:
    return Candidate(
        token_ids=tuple(output.token_ids),
        text=output.text,
        cumulative_logprob=output.cumulative_logprob,
        finish_reason=output.finish_reason,
        stop_reason=output.stop_reason,
    )
