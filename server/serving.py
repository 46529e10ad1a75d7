"""The serving logic behind both completion endpoints: plan, admit, run, stream, account.

A request becomes a :class:`Plan` (validated settings, limits checked, prompts tokenised
once, off the event loop), then one soft best-of-n run per returned choice, concurrently.
Streaming merges the choices' block events into OpenAI chunks. A disconnect, the request's
deadline or a server-wide abort (engine death, the end of a shutdown's drain) cancels the
runs, which aborts their engine requests; admission answers 429 instead of queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from common.config import AppConfig
from common.prompts import Prompt
from common.tasks import first_error
from engine.resolve import SettingsError, resolve_params
from engine.sbon import SBoNEngine
from engine.seeds import choice_seed
from engine.types import BlockEvent, SamplingSettings, SBoNParams, SBoNResult, TextEvent
from server.datalog import DataLog, build_record
from server.errors import (
    APIError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    sse_error_frame,
    to_api_error,
)
from server.limits import check_request_size
from server.metrics import Metrics
from server.protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)
from server.render import DONE, ChoiceResult, ChunkWriter, Kind, sbon_info

logger = logging.getLogger(__name__)

AnyRequest = CompletionRequest | ChatCompletionRequest


class ServingBackend(Protocol):
    """What the server needs of the engine beyond the soft best-of-n loop."""

    max_model_len: int

    def encode_prompt(self, prompt: Prompt) -> list[int]: ...

    def num_unfinished_requests(self) -> int: ...


class ServingRuntime(Protocol):
    """A started engine with its rewards (``engine.runtime.Runtime`` or a test double)."""

    @property
    def sbon(self) -> SBoNEngine: ...

    @property
    def backend(self) -> ServingBackend: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A validated request, ready to run."""

    kind: Kind
    request_id: str
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    params: SBoNParams
    sampling: SamplingSettings
    choices_per_prompt: int
    show_sbon: bool
    return_candidates: bool
    include_usage: bool
    arrived: float
    deadline: float  # event-loop time by which the whole request must be answered
    candidates: int  # prompts x n x sbon.n: what admission counts
    log: bool = True  # False: the request opted out of the distillation log (sbon.log)

    def slots(self) -> list[tuple[int, int]]:
        """(choice index, prompt index) of every returned choice, in OpenAI's order."""
        return [(p * self.choices_per_prompt + c, p) for p in range(len(self.prompts))
                for c in range(self.choices_per_prompt)]


class Admission:
    """Admission control: completion requests and, across them, candidates in flight.

    A request costs prompts x n x sbon.n candidates; it is admitted when both the request
    count and the candidate count stay within their caps, else refused at once with 429
    (no queueing), so one large request takes its share and no more.
    """

    def __init__(self, max_requests: int, max_candidates: int, metrics: Metrics) -> None:
        self.max_requests = max_requests
        self.max_candidates = max_candidates
        self.in_flight = 0
        self.candidates = 0
        self._metrics = metrics

    def acquire(self, candidates: int = 1) -> Callable[[], None]:
        """Take a slot for a request of ``candidates``; the returned function gives it back."""
        if self.in_flight >= self.max_requests:
            raise Overloaded(f"The server is serving its maximum of {self.max_requests} "
                             "concurrent requests; retry later.", None, "rate_limit_exceeded")
        if self.candidates + candidates > self.max_candidates:
            raise Overloaded(f"The server is generating {self.candidates} of its maximum of "
                             f"{self.max_candidates} candidates; this request needs {candidates}"
                             "; retry later.", None, "rate_limit_exceeded")
        self._move(1, candidates)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._move(-1, -candidates)

        return release

    def _move(self, requests: int, candidates: int) -> None:
        self.in_flight += requests
        self.candidates += candidates
        self._metrics.in_flight.set(self.in_flight)
        self._metrics.candidates_in_flight.set(self.candidates)


@dataclass
class AbortSignal:
    """A server-wide "stop now" with the error every request still running answers with."""

    reason: APIError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def trigger(self, reason: APIError) -> None:
        if self.reason is None:
            self.reason = reason
            self.event.set()


class CompletionService:
    """Plans and runs completion and chat completion requests over a started runtime."""

    def __init__(self, config: AppConfig, runtime: ServingRuntime, metrics: Metrics,
                 encoder: Executor | None = None, datalog: DataLog | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.metrics = metrics
        self.encoder = encoder  # where prompts are tokenised (None: asyncio's default pool)
        self.datalog = datalog  # the distillation log, when enabled

    # --- planning ------------------------------------------------------------------------

    async def plan(self, request: AnyRequest, request_id: str, arrived: float,
                   deadline: float) -> Plan:
        """Validate a request against the server's policy and tokenise its prompts.

        Counts and characters are checked first (server/limits.py), so that tokenising,
        which runs in a worker thread, only ever sees bounded input.
        """
        self._check_model(request.model)
        _refuse_unsupported(request)
        limits = self.config.limits
        check_request_size(request, limits)
        params = self._params(request)
        kind: Kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
        prompts = _prompts(request)
        candidates = len(prompts) * request.n * params.n
        if candidates > limits.max_candidates_in_flight:
            raise InvalidRequest(
                f"{len(prompts)} prompts x n = {request.n} x sbon.n = {params.n} make "
                f"{candidates} candidates; the server runs at most "
                f"{limits.max_candidates_in_flight} at once", "sbon.n", "limit_exceeded")
        prompt_ids = await self._encode(prompts)
        max_tokens = self._max_tokens(request, max(len(ids) for ids in prompt_ids))
        if params.block_size is not None:
            blocks = math.ceil(max_tokens / params.block_size)
            if blocks > limits.max_blocks:
                raise InvalidRequest(
                    f"{max_tokens} tokens in blocks of {params.block_size} make {blocks} blocks; "
                    f"the maximum is {limits.max_blocks}", "sbon.block_size", "limit_exceeded")
        sampling = SamplingSettings(
            temperature=request.temperature, top_p=request.top_p, top_k=max(0, request.top_k),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, max_tokens=max_tokens,
            stop=request.stop_list(), seed=request.seed)
        options = request.sbon
        return Plan(
            kind=kind, request_id=request_id, prompts=prompts, prompt_ids=prompt_ids,
            params=params, sampling=sampling, choices_per_prompt=request.n,
            show_sbon=options is not None or self.config.sbon.enabled,
            return_candidates=bool(options and options.return_candidates),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            arrived=arrived, deadline=deadline, candidates=candidates,
            log=not (options is not None and options.log is False))

    async def _encode(self, prompts: list[Prompt]) -> list[list[int]]:
        """Token ids of every prompt, computed in a worker thread (chat templates and
        tokenizers take milliseconds per prompt; the event loop must not wait on them)."""
        backend = self.runtime.backend
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.encoder, lambda: [backend.encode_prompt(p) for p in prompts])

    def _check_model(self, model: str) -> None:
        served = self.config.model.public_name
        if model != served:
            raise NotFound(f"The model '{model}' does not exist; this server serves '{served}'.",
                           "model", "model_not_found")

    def _params(self, request: AnyRequest) -> SBoNParams:
        options = request.sbon
        try:
            params = resolve_params(self.config.sbon,
                                    options.overrides() if options is not None else None)
        except SettingsError as exc:
            raise InvalidRequest(str(exc), f"sbon.{exc.param}", "invalid_value") from exc
        # Step-aligned blocks can be short: the number of selections is bounded in the loop.
        params = replace(params, max_blocks=self.config.limits.max_blocks)
        if params.n > self.config.limits.max_candidates:
            raise InvalidRequest(f"sbon.n must be at most {self.config.limits.max_candidates}",
                                 "sbon.n", "limit_exceeded")
        self.runtime.sbon.scorer_for(params.reward)  # 404 for an unknown reward, before any work
        return params

    def _max_tokens(self, request: AnyRequest, prompt_len: int) -> int:
        limits, context = self.config.limits, self.runtime.backend.max_model_len
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) \
            else "max_tokens"
        room = context - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"The prompt has {prompt_len} tokens; this model's context is {context} tokens.",
                "messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                "context_length_exceeded")
        wanted = request.requested_max_tokens()
        if wanted is None:
            return min(limits.max_tokens, room)
        if wanted > limits.max_tokens:
            raise InvalidRequest(f"{param} must be at most {limits.max_tokens}", param,
                                 "limit_exceeded")
        if wanted > room:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} "
                "for the completion).", param, "context_length_exceeded")
        return wanted

    # --- running -------------------------------------------------------------------------

    def _sampling_for(self, plan: Plan, choice: int) -> SamplingSettings:
        # Per prompt: a batch of prompts with one seed answers each as a single request would.
        seed = choice_seed(plan.sampling.seed, choice % plan.choices_per_prompt)
        if seed == plan.sampling.seed:
            return plan.sampling
        values = plan.sampling.__dict__ | {"seed": seed}
        return SamplingSettings(**values)

    def _engine_id(self, plan: Plan, choice: int) -> str:
        # Unique even when a client reuses its X-Request-Id for concurrent requests.
        return f"{plan.request_id}.{uuid.uuid4().hex[:8]}.c{choice}"

    async def _run_choice(self, plan: Plan, choice: int, prompt_index: int) -> ChoiceResult:
        result = await self.runtime.sbon.run(
            plan.prompts[prompt_index], plan.params, self._sampling_for(plan, choice),
            self._engine_id(plan, choice), plan.prompt_ids[prompt_index])
        self.observe(plan, result, choice)
        return ChoiceResult(choice, prompt_index, result)

    async def complete(self, plan: Plan) -> list[ChoiceResult]:
        """Run every choice concurrently; the first failure cancels the others."""
        self.metrics.phase_seconds.labels("queue").observe(time.perf_counter() - plan.arrived)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._run_choice(plan, c, p)) for c, p in plan.slots()]
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        return [t.result() for t in tasks]

    def observe(self, plan: Plan, result: SBoNResult, choice: int = 0) -> None:
        """Per-choice metrics: phases, tokens, candidates, reward and distortion; the
        distillation log record of choice ``choice``."""
        self._log(plan, result, choice)
        m = self.metrics
        for phase in ("generation", "scoring", "selection"):
            m.phase_seconds.labels(phase).observe(result.timings.get(phase, 0.0))
        m.candidates.inc(plan.params.n * len(result.blocks))
        m.selections.inc(len(result.blocks))
        m.generated_tokens.inc(result.tokens_generated)
        m.scored_tokens.inc(result.tokens_scored)
        m.completion_tokens.inc(result.completion_tokens)
        m.prompt_tokens.inc(result.prompt_tokens)
        for stage, prefill in (("generation", result.prefill_generation),
                               ("scoring", result.prefill_scoring)):
            m.prefill_tokens.labels(stage, "computed").inc(prefill.computed)
            m.prefill_tokens.labels(stage, "cached").inc(prefill.cached)
        if plan.params.score:
            final = result.final_block
            m.chosen_reward.labels(result.reward_name).observe(final.chosen.reward)
            m.ess.observe(result.diagnostics.ess)
            m.kl_from_uniform.observe(result.diagnostics.kl_from_uniform)
            m.kl_estimate.observe(result.diagnostics.kl_estimate)

    def _log(self, plan: Plan, result: SBoNResult, choice: int) -> None:
        """Queue the choice's record (built by the writer thread; never blocks)."""
        if self.datalog is None or not plan.log or not plan.params.score:
            return
        self.datalog.submit(functools.partial(
            build_record, request_id=plan.request_id, logged_at=time.time(),
            model=self.config.model.public_name,
            prompt=plan.prompts[choice // plan.choices_per_prompt],
            sampling=self._sampling_for(plan, choice), result=result))

    # --- streaming -----------------------------------------------------------------------

    async def stream(self, plan: Plan, writer: ChunkWriter,
                     abort: AbortSignal | None = None) -> AsyncIterator[str]:
        """SSE frames: each chosen block as soon as it is selected, then usage and [DONE].

        Past the deadline, or on a server-wide abort, the stream ends with an error frame
        and [DONE], and the runs are cancelled.
        """
        self.metrics.phase_seconds.labels("queue").observe(time.perf_counter() - plan.arrived)
        queue: asyncio.Queue[tuple[int, BlockEvent | SBoNResult | BaseException | None]] = \
            asyncio.Queue()
        tasks = [asyncio.create_task(self._feed(plan, c, p, queue)) for c, p in plan.slots()]
        tasks.append(asyncio.create_task(_interrupt(plan.deadline, abort, queue)))
        finished: list[ChoiceResult] = []
        prompt_of = dict(plan.slots())
        try:
            for choice, _ in plan.slots():
                opening = writer.opening(choice)
                if opening:
                    yield opening
            while len(finished) < len(tasks) - 1:  # the last task is the interrupter
                choice, item = await queue.get()
                if isinstance(item, BaseException):
                    yield _stream_error(item)
                    yield DONE
                    return
                if isinstance(item, BlockEvent | TextEvent):
                    if item.text_delta:
                        yield writer.text(choice, item.text_delta)
                elif isinstance(item, SBoNResult):
                    finished.append(ChoiceResult(choice, prompt_of[choice], item))
                    sbon = sbon_info(item, plan.return_candidates) if plan.show_sbon else None
                    yield writer.finish(choice, item, sbon)
            if plan.include_usage:
                yield writer.usage(finished)
            yield DONE
        finally:
            await _cancel(tasks)

    async def _feed(self, plan: Plan, choice: int, prompt_index: int,
                    queue: asyncio.Queue[tuple[int, Any]]) -> None:
        try:
            async for event in self.runtime.sbon.stream(
                    plan.prompts[prompt_index], plan.params, self._sampling_for(plan, choice),
                    self._engine_id(plan, choice), plan.prompt_ids[prompt_index],
                    token_stream=True):
                if isinstance(event, SBoNResult):
                    self.observe(plan, event, choice)
                await queue.put((choice, event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # delivered to the client as an error frame
            await queue.put((choice, exc))


def _refuse_unsupported(request: AnyRequest) -> None:
    for name in sorted(request.model_fields_set & UNSUPPORTED_FIELDS.keys()):
        value = getattr(request, name)
        if not _is_neutral(value, UNSUPPORTED_FIELDS[name]):
            raise InvalidRequest(f"The parameter '{name}' is not supported by this server.",
                                 name, "unsupported_parameter")


def _is_neutral(value: Any, neutrals: Sequence[Any]) -> bool:
    # ``type`` is compared too, so that 0 does not pass for False or 1 for True.
    return any(value is n or (type(value) is type(n) and value == n) for n in neutrals)


def _prompts(request: AnyRequest) -> list[Prompt]:
    if isinstance(request, ChatCompletionRequest):
        return [request.prompt()]
    return list(request.prompts())


def _stream_error(exc: BaseException) -> str:
    return sse_error_frame(to_api_error(exc))


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _interrupt(deadline: float, abort: AbortSignal | None,
                     queue: asyncio.Queue[tuple[int, Any]]) -> None:
    """Put the error that ends a stream early into its queue: past the deadline, or abort."""
    try:
        async with asyncio.timeout_at(deadline):
            if abort is None:
                await asyncio.Event().wait()
            else:
                await abort.event.wait()
    except TimeoutError:
        await queue.put((-1, request_timed_out()))
        return
    assert abort is not None and abort.reason is not None
    await queue.put((-1, abort.reason))


def request_timed_out() -> DeadlineExceeded:
    return DeadlineExceeded("The request did not finish within the server's time limit "
                            "(limits.request_timeout_s); its work was stopped.", None,
                            "request_timeout")


async def supervise(work: Awaitable[Any], is_disconnected: Callable[[], Awaitable[bool]],
                    deadline: float, abort: AbortSignal | None = None,
                    poll_s: float = 0.25) -> Any:
    """Await ``work``; cancel it (and so its engine requests) if the client goes away
    (:class:`ClientGone`), past ``deadline`` (504) or on a server-wide abort (its error)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise request_timed_out()
            done, _ = await asyncio.wait({task}, timeout=min(poll_s, left))
            if done:
                return task.result()
            if abort is not None and abort.reason is not None:
                raise abort.reason
            if await is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            await _cancel([task])


class ClientGone(Exception):
    """The client disconnected before its response was ready."""
