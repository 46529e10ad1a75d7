"""The FastAPI app: factory, lifespan, middleware and thin routes; ``run_server`` for uvicorn.

The lifespan starts the engine and reward scorers in the background, so ``/health`` answers
503 while they load and 200 once they are ready, watches the engine, and closes everything
on shutdown (server/lifecycle.py). Tests inject a runtime starter (fakes) through
:func:`create_app`. The logic lives in :mod:`server.serving`, the schemas in
:mod:`server.protocol`, the per-request limits in :mod:`server.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from common.config import AppConfig
from server import lifecycle
from server.datalog import DataLog
from server.errors import Unavailable, error_response, install_error_handlers, to_api_error
from server.lifecycle import RuntimeStarter, ServerState, serving_runtime
from server.metrics import CONTENT_TYPE, Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.render import ChunkWriter, response_body
from server.serving import (
    Admission,
    AnyRequest,
    ClientGone,
    CompletionService,
    supervise,
)

__all__ = ["ServerState", "create_app", "run_server"]

logger = logging.getLogger("sbon.server")

CLIENT_CLOSED_REQUEST = 499  # the client went away before the response (nginx's code)
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request, key, size or rate"},
    "5XX": {"model": ErrorResponse, "description": "Unavailable, timed out or failed"},
}


async def _default_starter(config: AppConfig) -> Any:
    from engine.runtime import start_runtime

    return await start_runtime(config)


def create_app(config: AppConfig, start_runtime: RuntimeStarter | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the app; ``start_runtime`` builds the engine and rewards (fakes in tests);
    ``on_fatal`` is called when the engine fails to start or dies."""
    metrics = Metrics()
    limits = config.limits
    state = ServerState(config, metrics, Admission(limits.max_concurrent_requests,
                                                    limits.max_candidates_in_flight, metrics),
                        on_fatal=on_fatal)
    starter = start_runtime or _default_starter

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.warn_if_exposed(config)
        if config.datalog.enabled:  # a folder that cannot be written fails the start
            state.datalog = DataLog(config.datalog, metrics)
            state.datalog.start()
        tasks = [asyncio.create_task(lifecycle.start_in_background(state, starter),
                                     name="sbon-start"),
                 asyncio.create_task(lifecycle.watch_engine(state), name="sbon-watchdog")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if state.datalog is not None:  # writes what is queued, then fsyncs
                await asyncio.to_thread(state.datalog.close)
            if state.runtime is not None:
                await state.runtime.close()
                state.runtime = None
            state.encoder.shutdown(wait=False, cancel_futures=True)
            logger.info("server stopped")

    app = FastAPI(title="SoftBoN Serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible soft best-of-n decoding.")
    app.state.sbon = state
    metrics.engine_requests.set_function(
        lambda: float(state.runtime.backend.num_unfinished_requests()) if state.runtime else 0.0)
    install_error_handlers(app)
    _add_routes(app, state)
    # Added innermost first: context (outermost), then the key, then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes,
                       timeout_s=limits.body_timeout_s)
    key = config.server.api_key
    app.add_middleware(APIKeyMiddleware, api_key=key.get_secret_value() if key else None)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="200 when the engine is ready (with each reward's state), "
             "else 503")
    async def health() -> Response:
        return _health(state)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.config.model.public_name,
                                         created=state.started_at)])

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(state, body, request)

    @app.post("/v1/chat/completions",
              responses={200: {"model": ChatCompletionResponse}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, body, request)


def _health(state: ServerState) -> Response:
    """200 with each reward's state once serving (``degraded`` when a reward is failing);
    503 while loading, after a failed start, with a dead engine, and while draining."""
    try:
        runtime = serving_runtime(state)
    except Unavailable as exc:
        if exc.code in ("engine_loading", "start_failed"):
            message = ("The server failed to start." if state.failure
                       else "The model is still loading.")
            exc = Unavailable(message, None, "not_ready")
        return error_response(exc)
    rewards = {name: scorer.status() for name, scorer in runtime.sbon.scorers.items()
               if hasattr(scorer, "status")}
    degraded = any(r["state"] != "ok" for r in rewards.values())
    return JSONResponse({"status": "degraded" if degraded else "ok",
                         "model": state.config.model.public_name, "rewards": rewards})


async def _serve(state: ServerState, body: AnyRequest, request: Request) -> Response:
    service = CompletionService(state.config, serving_runtime(state), state.metrics,
                                state.encoder, state.datalog)
    arrived: float = request.state.arrived
    limits = state.config.limits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_timeout_s - (time.perf_counter() - arrived)
    plan = await service.plan(body, request.state.request_id, arrived, deadline)
    release = state.admission.acquire(plan.candidates)

    def finish() -> None:
        release()
        state.metrics.phase_seconds.labels("total").observe(time.perf_counter() - plan.arrived)

    prefix = "chatcmpl" if plan.kind == "chat" else "cmpl"
    response_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    model = state.config.model.public_name
    if body.stream:
        writer = ChunkWriter(plan.kind, response_id, created, model, plan.include_usage)
        return SlotStreamingResponse(service.stream(plan, writer, state.abort), finish,
                                     limits.send_timeout_s, plan.request_id)
    try:
        choices = await supervise(service.complete(plan), request.is_disconnected,
                                  plan.deadline, state.abort)
    except ClientGone:
        logger.info("client disconnected; its engine requests were aborted",
                    extra={"request_id": plan.request_id})
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:  # mapped once here; unexpected ones are logged with traceback
        raise to_api_error(exc) from exc
    finally:
        finish()
    return JSONResponse(response_body(plan.kind, response_id, created, model, choices,
                                      plan.show_sbon, plan.return_candidates))


class SlowReader(Exception):
    """A streaming client did not take a frame within ``limits.send_timeout_s``."""


class SlotStreamingResponse(StreamingResponse):
    """An event stream that gives its admission slot back however the stream ends, and cuts
    off a client that stops reading (its runs are cancelled, so engine requests abort)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None],
                 send_timeout_s: float, request_id: str) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._release = release
        self._send_timeout_s = send_timeout_s
        self._request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await send(message)
            except TimeoutError:
                raise SlowReader() from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except SlowReader:
            # Nothing more can reach this client; returning unfinished closes the connection.
            logger.warning("a streaming client stopped reading; its request was stopped",
                           extra={"request_id": self._request_id,
                                  "send_timeout_s": self._send_timeout_s})
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            self._release()


def run_server(config: AppConfig) -> int:
    """Serve until SIGTERM (exit 0), or until the engine fails to start or dies (exit 1)."""
    return lifecycle.run_server(config, create_app)
