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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import jinja2

from common.config import AppConfig
from common.prompts import Prompt, chat_messages, prompt_as_text
from common.tasks import first_error
from engine.backend import (
    BackendError,
    InvalidGenerationRequest,
    PromptFormatError,
    PromptTooLongError,
)
from engine.model_prep import resolve_model_path
from engine.parallel import prepare_parallel, scoped_environment
from engine.types import Candidate, PrefillTokens, SamplingSettings
from reward.judge import LabelLogprobs

logger = logging.getLogger(__name__)

# New token ids of one output, and the prompt's computed/cached prefill counts.
OutputCallback = Callable[[Sequence[int], PrefillTokens], None]

# The prefix cache reuses whole KV blocks only. vLLM's CPU default (128 tokens) leaves a
# short judge query or block tail uncached; its attention kernel takes multiples of 32.
CPU_KV_BLOCK_SIZE = 32


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
    block_size = kv_block_size(engine.kv_block_size)
    if block_size:
        kwargs["block_size"] = block_size
    if engine.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = engine.distributed_executor_backend
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    chunked = engine.enable_chunked_prefill
    if chunked is None and on_cpu():
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


def kv_block_size(configured: int | None) -> int | None:
    """The KV block size to ask vLLM for: the configured one, 32 on the CPU backend, or
    None for vLLM's own default."""
    return configured or (CPU_KV_BLOCK_SIZE if on_cpu() else None)


def on_cpu() -> bool:
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


def engine_environment(config: AppConfig, on_cpu: bool,
                       environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables the engine's processes need, beyond what ``environ`` has.

    They are read by the engine core process, which vLLM spawns: set them before it starts.

    - ``TORCHDYNAMO_DISABLE``: on the CPU backend torch.compile (vLLM compiles helper kernels
      even in eager mode) needs a C++ compiler at run time; without one the first request
      kills the engine. ``engine.torch_compile`` decides; unset, compile is off on the CPU
      backend with ``enforce_eager`` unless the environment already says.
    - ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: with one CPU worker (nothing parallel) the
      worker runs inside the engine core process (vLLM's single-process executor) instead of
      a child connected by ring buffers in /dev/shm (about 400 MiB; containers get 64 MiB).
    - ``OMP_WAIT_POLICY=PASSIVE`` with that executor: OpenMP threads that spin between
      parallel regions then compete with the engine loop in the same process (measured on 2
      busy cores: 2.5-10x the CPU time per request; passive waiting was as fast as vLLM's
      multi-process executor, with less CPU).
    """
    engine = config.engine
    wanted: dict[str, str] = {}
    if engine.torch_compile is not None:
        wanted["TORCHDYNAMO_DISABLE"] = "0" if engine.torch_compile else "1"
    elif on_cpu and engine.enforce_eager and "TORCHDYNAMO_DISABLE" not in environ:
        wanted["TORCHDYNAMO_DISABLE"] = "1"
    single = (engine.tensor_parallel_size * engine.pipeline_parallel_size
              * engine.data_parallel_size) == 1
    if (on_cpu and single and engine.distributed_executor_backend in (None, "uni")
            and "VLLM_ENABLE_V1_MULTIPROCESSING" not in environ):
        wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    in_process = wanted.get("VLLM_ENABLE_V1_MULTIPROCESSING",
                            environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")) == "0"
    if on_cpu and in_process and "OMP_WAIT_POLICY" not in environ:
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    return wanted


class VLLMBackend:
    """:class:`engine.backend.GenerationBackend` over ``vllm.v1.engine.async_llm.AsyncLLM``."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._engine: Any = None
        self._tokenizer: Any = None
        self._label_ids: dict[str, int] = {}
        self.model_name = config.model.public_name
        self.max_model_len = config.engine.max_model_len
        self.model_path = ""
        # Prefix caching reuses whole blocks of this many tokens (None: vLLM's default).
        self.kv_block_tokens = kv_block_size(config.engine.kv_block_size)

    async def start(self) -> None:
        """Prepare the model folder (embedded default) and start the engine."""
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_path = await asyncio.to_thread(resolve_model_path, self._config.model)
        _apply_cpu_kv_cache(self._config)
        os.environ.update(engine_environment(self._config, on_cpu(), os.environ))
        # Parallel CPU workers need their thread binding while vLLM spawns them, and only
        # this engine's workers (engine/parallel.py).
        workers = prepare_parallel(self._config.engine, self.model_path, on_cpu())
        args = build_engine_args(self._config, self.model_path)
        # In a worker thread: building the engine takes seconds to minutes, and the server's
        # event loop must keep answering /health (503) meanwhile.
        with scoped_environment(workers):
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
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

    @property
    def dead_error(self) -> BaseException | None:
        if self._engine is None or not self._engine.errored:
            return None
        error: BaseException = self._engine.dead_error
        return error

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        if getattr(tokenizer, "chat_template", None) is None:
            return list(tokenizer.encode(prompt_as_text(prompt) + "\nassistant:"))
        messages = chat_messages(prompt)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        except jinja2.TemplateError as exc:  # raise_exception() in the template: the input's fault
            raise PromptFormatError("The model's chat template refused these messages: "
                                    f"{str(exc)[:200]}") from None
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
            stop=_stops(sampling),
            # A step delimiter stays in the block's text; a client's stop strings are cut
            # from it again below (``_without_client_stop``).
            include_stop_str_in_output=bool(sampling.block_delimiter),
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
        """``n`` samples, one engine request each, sample i seeded ``seed + i``.

        Samples that start at the same instant cannot share a prefix none of them has
        computed yet, so each would prefill the uncached part of the prompt itself. The
        first sample goes alone until its prefill is done; the others then find the
        prompt's KV blocks in the prefix cache (one engine step later).
        """
        prefilled = asyncio.Event()

        async def first() -> Candidate:
            async for item in self._sample(prompt_token_ids, sampling, max_tokens,
                                           f"{request_id}-0", seed, prefilled):
                if isinstance(item, Candidate):
                    return item
            raise BackendError("the engine returned no output")

        async def other(index: int) -> Candidate:
            await prefilled.wait()
            async for item in self._sample(prompt_token_ids, sampling, max_tokens,
                                           f"{request_id}-{index}", _sample_seed(seed, index)):
                if isinstance(item, Candidate):
                    return item
            raise BackendError("the engine returned no output")

        tasks = [first(), *(other(i) for i in range(1, n))]
        try:
            async with asyncio.TaskGroup() as group:
                running = [group.create_task(t) for t in tasks]
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        return [task.result() for task in running]

    async def generate_n_request(self, prompt_token_ids: Sequence[int], n: int,
                                 sampling: SamplingSettings, max_tokens: int, request_id: str,
                                 seed: int | None) -> list[Candidate]:
        """vLLM's own n-sampling: one engine request with ``n`` samples (the benchmark's
        floor). vLLM reports the prefix-cache hits of one sample only, so the counts are
        that sample's, times n."""
        params = self._sampling_params(len(prompt_token_ids), n, sampling, max_tokens, seed,
                                       delta=False)
        final = None
        async for output in self._outputs(prompt_token_ids, params, request_id):
            final = output
        if final is None:
            raise BackendError("the engine returned no output")
        prefill = prefill_tokens(len(prompt_token_ids), final.num_cached_tokens)
        return [Candidate(tuple(o.token_ids), o.text, o.cumulative_logprob, o.finish_reason,
                          o.stop_reason, prefill)
                for o in sorted(final.outputs, key=lambda o: o.index)]

    async def generate_stream(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: str,
        seed: int | None,
    ) -> AsyncIterator[str | Candidate]:
        async for item in self._sample(prompt_token_ids, sampling, max_tokens, request_id, seed):
            yield item

    async def sample_one(self, prompt_token_ids: Sequence[int], sampling: SamplingSettings,
                         max_tokens: int, request_id: str, seed: int | None, *,
                         on_output: OutputCallback,
                         prefilled: asyncio.Event | None = None) -> Candidate:
        """One sample as its own engine request, its new token ids reported as they decode.

        Early pruning (engine/pruned.py) stops a sample by cancelling this call, which
        aborts its engine request. Same sampling and seed as :meth:`generate`'s samples.
        """
        async for item in self._sample(prompt_token_ids, sampling, max_tokens, request_id,
                                       seed, prefilled, on_output):
            if isinstance(item, Candidate):
                return item
        raise BackendError("the engine returned no output")

    async def _sample(self, prompt_token_ids: Sequence[int], sampling: SamplingSettings,
                      max_tokens: int, request_id: str, seed: int | None,
                      prefilled: asyncio.Event | None = None,
                      on_output: OutputCallback | None = None) -> AsyncIterator[str | Candidate]:
        """One sample: text deltas as they decode, then the :class:`Candidate`.

        ``prefilled`` is set once the engine has computed the prompt (its first output);
        ``on_output`` receives each output's new token ids and the prompt's prefill counts.
        """
        params = self._sampling_params(len(prompt_token_ids), 1, sampling, max_tokens, seed,
                                       delta=True)
        token_ids: list[int] = []
        text: list[str] = []
        last = output = None
        try:
            async for output in self._outputs(prompt_token_ids, params, request_id):
                if prefilled is not None:
                    prefilled.set()
                last = output.outputs[0]
                token_ids.extend(last.token_ids)
                if on_output is not None:
                    on_output(last.token_ids,
                              prefill_tokens(len(prompt_token_ids), output.num_cached_tokens))
                if last.text:
                    text.append(last.text)
                    yield last.text
        finally:
            if prefilled is not None:
                prefilled.set()  # never leave the other samples waiting
        if last is None or output is None:
            raise BackendError("the engine returned no output")
        full_text = _without_client_stop("".join(text), last.stop_reason, sampling)
        yield Candidate(tuple(token_ids), full_text, last.cumulative_logprob,
                        last.finish_reason, last.stop_reason,
                        prefill_tokens(len(prompt_token_ids), output.num_cached_tokens))

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's cached prefixes (used between benchmark methods)."""
        if self._engine is None:
            return False
        return bool(await self._engine.reset_prefix_cache())

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a piece of text inside a conversation (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def follow_up_ids(self, question: str) -> list[int]:
        """Tokens that close the assistant's turn and ask ``question`` as the next user turn,
        then open the assistant's answer: what follows a response in the chat template."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            return self.encode_text(f"\nuser: {question}\nassistant:")
        mark = "SBON-RESPONSE-END"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark},
             {"role": "user", "content": question}],
            add_generation_prompt=True, tokenize=False)
        return self.encode_text(rendered[rendered.index(mark) + len(mark):])

    async def label_logprobs(self, token_ids: Sequence[int],
                             labels: Sequence[str]) -> LabelLogprobs:
        """Log-probabilities of each label's first token as the next token after
        ``token_ids`` (the judge reward's query), with the query's prefill accounting."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise BackendError("the engine is not started")
        label_ids = [self._label_token(label) for label in labels]
        params = SamplingParams(n=1, max_tokens=1, temperature=1.0,
                                logprob_token_ids=label_ids,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self._outputs(token_ids, params, f"judge-{uuid.uuid4().hex}"):
            final = output
        if final is None or not final.outputs[0].logprobs:
            raise BackendError("the engine returned no log-probabilities")
        step = final.outputs[0].logprobs[0]
        prefill = prefill_tokens(len(token_ids), final.num_cached_tokens)
        return LabelLogprobs([float(step[t].logprob) for t in label_ids],
                             prefill.computed, prefill.cached)

    def _label_token(self, label: str) -> int:
        """The label's first token id, encoded once per label (every judge query asks)."""
        if label not in self._label_ids:
            ids = self.tokenizer.encode(label, add_special_tokens=False)
            if not ids:
                raise ValueError(f"the label '{label}' encodes to no token")
            self._label_ids[label] = int(ids[0])
        return self._label_ids[label]


def prefill_tokens(prompt_len: int, cached: int | None) -> PrefillTokens:
    """Computed and cached prompt tokens of one engine request, as vLLM reports them."""
    hit = min(max(int(cached or 0), 0), prompt_len)
    return PrefillTokens(computed=prompt_len - hit, cached=hit)


def _stops(sampling: SamplingSettings) -> list[str] | None:
    stops = list(sampling.stop)
    if sampling.block_delimiter and sampling.block_delimiter not in stops:
        stops.append(sampling.block_delimiter)
    return stops or None


def _without_client_stop(text: str, stop_reason: str | int | None,
                         sampling: SamplingSettings) -> str:
    """The text without a client's stop string, which vLLM kept because a step delimiter
    asked it to keep stop strings (OpenAI's stop strings are never returned)."""
    if (sampling.block_delimiter and isinstance(stop_reason, str)
            and stop_reason in sampling.stop and text.endswith(stop_reason)):
        return text[: len(text) - len(stop_reason)]
    return text


def _sample_seed(seed: int | None, index: int) -> int | None:
    # The seeds vLLM itself gives the samples of an n-request: seed + index.
    return None if seed is None else seed + index
