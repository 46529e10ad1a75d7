"""The serving logic behind both completion endpoints: one owner for each request's life.

:meth:`CompletionService.serve` takes a parsed request from its route and answers it:
checks that need no tokenizer, then admission (a full server answers 429 before any
tokenising), then the :class:`~server.planning.Plan` (prompts tokenised once, off the event
loop), then one soft best-of-n run per returned choice, concurrently, answered as one body
or as an event stream. One :class:`~server.stopping.StopSignal` per request (client gone,
deadline passed, server aborting) stops either path and so aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from common.config import AppConfig
from common.tasks import first_error
from engine.types import BlockEvent, SBoNResult, TextEvent
from server.datalog import DataLog, build_record
from server.errors import Overloaded, sse_error_frame, to_api_error
from server.metrics import Metrics
from server.planning import AnyRequest, Draft, Plan, Planner, ServingRuntime
from server.render import DONE, ChoiceResult, ChunkWriter, response_body, sbon_info
from server.stopping import AbortSignal, ClientGone, StopSignal, cancel_all

__all__ = ["Admission", "AnyRequest", "CompletionService", "Plan", "ServingRuntime"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # the client went away before the response (nginx's code)
StreamItem = BlockEvent | TextEvent | SBoNResult | BaseException


class Admission:
    """Admission control: completion requests and, across them, candidates in flight.

    A request costs prompts x n x sbon.n candidates; it is admitted when both the request
    count and the candidate count stay within their caps, else refused at once with 429
    (no queueing), so one large request takes its share and no more. A request holds its
    slot from before its prompts are tokenised until its response is complete, so the
    tokenizer's queue is bounded by the request cap too.
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


class CompletionService:
    """Serves completion and chat completion requests; built once when the app is built.

    ``runtime`` returns the started runtime or raises the 503 that says why there is none;
    ``draining`` says whether a shutdown is under way; ``abort`` stops every request.
    """

    def __init__(self, config: AppConfig, metrics: Metrics, admission: Admission,
                 abort: AbortSignal, runtime: Callable[[], ServingRuntime],
                 draining: Callable[[], bool], encoder: Executor | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.admission = admission
        self.abort = abort
        self.planner = Planner(config, encoder)
        self.datalog: DataLog | None = None  # the distillation log, set when it starts
        self._runtime = runtime
        self._draining = draining

    # --- a request's life ------------------------------------------------------------------

    async def serve(self, body: AnyRequest, request: Request) -> Response:
        """Answer one request: checks, admission, plan, then the streaming or plain path."""
        try:
            runtime = self._runtime()  # 503 while loading, draining, or with a dead engine
            draft = self.planner.draft(body, runtime)
            release = self.admission.acquire(draft.candidates)  # 429 before tokenising
        except Exception as exc:
            raise to_api_error(exc) from exc
        arrived: float = request.state.arrived  # event-loop time (server/middleware.py)
        deadline = arrived + self.config.limits.request_timeout_s  # the one clock: the loop's
        stop = StopSignal(deadline, self.abort, request.receive, self._draining)

        async def finish() -> None:
            await stop.close()
            release()
            loop_time = asyncio.get_running_loop().time()
            self.metrics.phase_seconds.labels("total").observe(loop_time - arrived)

        planning = self.planner.plan(draft, runtime, request.state.request_id, arrived, deadline)
        return await self._admitted(draft, planning, runtime, stop, finish,
                                    request.state.request_id)

    async def _admitted(self, draft: Draft, planning: Awaitable[Plan], runtime: ServingRuntime,
                        stop: StopSignal, finish: Callable[[], Awaitable[None]],
                        request_id: str) -> Response:
        """The admitted part of :meth:`serve`; ``finish`` runs once the response is done."""
        streaming = False
        try:
            plan = await stop.guard(planning)
            if draft.request.stream:
                streaming = True  # the stream's end finishes the request
                return EventStream(self.stream(plan, runtime, stop), finish,
                                   self.config.limits.send_timeout_s, plan.request_id)
            choices = await stop.guard(self.complete(plan, runtime))
        except ClientGone:
            logger.info("client disconnected; its engine requests were aborted",
                        extra={"request_id": request_id})
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # mapped once here; unexpected ones are logged with traceback
            raise to_api_error(exc) from exc
        finally:
            if not streaming:
                await finish()
        return JSONResponse(response_body(plan.kind, plan.response_id, plan.created,
                                          plan.model, choices, plan.show_sbon,
                                          plan.return_candidates))

    # --- running -------------------------------------------------------------------------

    async def complete(self, plan: Plan, runtime: ServingRuntime) -> list[ChoiceResult]:
        """Run every choice concurrently; the first failure cancels the others."""
        self._observe_queue(plan)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._run_choice(plan, runtime, c, p))
                         for c, p in plan.slots()]
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        return [t.result() for t in tasks]

    async def _run_choice(self, plan: Plan, runtime: ServingRuntime, choice: int,
                          prompt_index: int) -> ChoiceResult:
        result = await runtime.sbon.run(
            plan.prompts[prompt_index], plan.params, plan.sampling_for(choice),
            self._engine_id(plan, choice), plan.prompt_ids[prompt_index])
        self.observe(plan, result, choice)
        return ChoiceResult(choice, prompt_index, result)

    def _engine_id(self, plan: Plan, choice: int) -> str:
        # Unique even when a client reuses its X-Request-Id for concurrent requests.
        return f"{plan.request_id}.{uuid.uuid4().hex[:8]}.c{choice}"

    def _observe_queue(self, plan: Plan) -> None:
        waited = asyncio.get_running_loop().time() - plan.arrived
        self.metrics.phase_seconds.labels("queue").observe(waited)

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
        m.computed_tokens.inc(result.tokens_computed)
        if result.pruning is not None:
            m.pruned_candidates.labels(result.pruning.mode).inc(result.pruning.pruned)
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
        # Particles are left out: a block's other slots continue other ancestors, so the
        # log's "chosen blocks + each last candidate" responses would not be real ones.
        if (self.datalog is None or not plan.log or not plan.params.score
                or plan.params.particles):
            return
        self.datalog.submit(functools.partial(
            build_record, request_id=plan.request_id, logged_at=time.time(),
            model=plan.model, prompt=plan.prompts[choice // plan.choices_per_prompt],
            sampling=plan.sampling_for(choice), result=result))

    # --- streaming -----------------------------------------------------------------------

    async def stream(self, plan: Plan, runtime: ServingRuntime,
                     stop: StopSignal) -> AsyncGenerator[str, None]:
        """SSE frames: each chosen block as soon as it is selected, then usage and [DONE].

        When the request must stop (deadline, server abort) the stream ends with an error
        frame and [DONE]; when its client left, it just ends. Either way the runs are
        cancelled, which aborts their engine requests.
        """
        self._observe_queue(plan)
        writer = ChunkWriter(plan.kind, plan.response_id, plan.created, plan.model,
                             plan.include_usage)
        queue: asyncio.Queue[tuple[int, StreamItem]] = asyncio.Queue()
        feeds = [asyncio.create_task(self._feed(plan, runtime, c, p, queue))
                 for c, p in plan.slots()]
        tasks = [*feeds, asyncio.create_task(_relay_stop(stop, queue))]
        try:
            for choice, _ in plan.slots():
                opening = writer.opening(choice)
                if opening:
                    yield opening
            async for frame in self._frames(plan, writer, queue, len(feeds)):
                yield frame
        finally:
            await cancel_all(tasks)

    async def _frames(self, plan: Plan, writer: ChunkWriter,
                      queue: asyncio.Queue[tuple[int, StreamItem]],
                      choices: int) -> AsyncIterator[str]:
        """The frames after the openings, from the choices' events as they come."""
        finished: list[ChoiceResult] = []
        prompt_of = dict(plan.slots())
        while len(finished) < choices:
            choice, item = await queue.get()
            if isinstance(item, ClientGone):
                return  # nobody is left to tell
            if isinstance(item, BaseException):
                yield sse_error_frame(to_api_error(item))
                yield DONE
                return
            if isinstance(item, BlockEvent | TextEvent):
                if item.text_delta:
                    yield writer.text(choice, item.text_delta)
            else:
                finished.append(ChoiceResult(choice, prompt_of[choice], item))
                sbon = sbon_info(item, plan.return_candidates) if plan.show_sbon else None
                yield writer.finish(choice, item, sbon)
        if plan.include_usage:
            yield writer.usage(finished)
        yield DONE

    async def _feed(self, plan: Plan, runtime: ServingRuntime, choice: int, prompt_index: int,
                    queue: asyncio.Queue[tuple[int, StreamItem]]) -> None:
        try:
            async for event in runtime.sbon.stream(
                    plan.prompts[prompt_index], plan.params, plan.sampling_for(choice),
                    self._engine_id(plan, choice), plan.prompt_ids[prompt_index],
                    token_stream=True):
                if isinstance(event, SBoNResult):
                    self.observe(plan, event, choice)
                await queue.put((choice, event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # delivered to the client as an error frame
            await queue.put((choice, exc))


async def _relay_stop(stop: StopSignal, queue: asyncio.Queue[tuple[int, StreamItem]]) -> None:
    """Put the reason a stream must stop into its queue, when there is one."""
    await queue.put((-1, await stop.wait()))


class SlowReader(Exception):
    """A streaming client did not take a frame within ``limits.send_timeout_s``."""


class EventStream(Response):
    """A request's event stream: its frames, sent each within ``send_timeout_s``; then
    ``finish`` (the admission slot back, the stop signal closed) however it ended.

    It does not listen for disconnects itself (Starlette's StreamingResponse would): the
    request's stop signal does, for both paths. A client that stops reading is cut off.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[str, None], finish: Callable[[], Awaitable[None]],
                 send_timeout_s: float, request_id: str) -> None:
        # No body and so no Content-Length: the frames follow as they are made.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache"})
        self._frames = frames
        self._finish = finish
        self._send_timeout_s = send_timeout_s
        self._request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._send_all(send)
        except SlowReader:
            # Nothing more can reach this client; returning unfinished closes the connection.
            logger.warning("a streaming client stopped reading; its request was stopped",
                           extra={"request_id": self._request_id,
                                  "send_timeout_s": self._send_timeout_s})
        except OSError:
            pass  # the client is gone (uvicorn raises on send); its stop signal saw it too
        finally:
            await self._frames.aclose()  # cancels the runs: their engine requests abort
            await self._finish()

    async def _send_all(self, send: Send) -> None:
        await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
        async for frame in self._frames:
            await self._send(send, {"type": "http.response.body", "body": frame.encode(),
                                    "more_body": True})
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, message: Message) -> None:
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await send(message)
        except TimeoutError:
            raise SlowReader() from None
