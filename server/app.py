"""The FastAPI app: factory, lifespan, middleware and thin routes; ``run_server`` for uvicorn.

The lifespan starts the engine and reward scorers in the background, so ``/health`` answers
503 while they load and 200 once they are ready; it closes them on shutdown. Tests inject a
runtime starter (fakes) through :func:`create_app`. The logic lives in
:mod:`server.serving`, the schemas in :mod:`server.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import AppConfig, non_default_values
from server.errors import (
    Unauthorized,
    Unavailable,
    error_response,
    install_error_handlers,
    to_api_error,
)
from server.metrics import CONTENT_TYPE, Metrics
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.render import ChunkWriter, response_body
from server.serving import (
    Admission,
    AnyRequest,
    ClientGone,
    CompletionService,
    ServingRuntime,
    require_ready,
    until_disconnected,
)

logger = logging.getLogger("sbon.server")

RuntimeStarter = Callable[[AppConfig], Awaitable[ServingRuntime]]
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
CLIENT_CLOSED_REQUEST = 499  # the client went away before the response (nginx's code)


@dataclass
class ServerState:
    """Everything one app holds: configuration, metrics, and the runtime once started."""

    config: AppConfig
    metrics: Metrics
    admission: Admission
    runtime: ServingRuntime | None = None
    failure: str | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    on_fatal: Callable[[], None] | None = None


async def _default_starter(config: AppConfig) -> ServingRuntime:
    from engine.runtime import start_runtime

    return await start_runtime(config)


def create_app(config: AppConfig, start_runtime: RuntimeStarter | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the app; ``start_runtime`` builds the engine and rewards (fakes in tests)."""
    metrics = Metrics()
    state = ServerState(config, metrics, Admission(config.limits.max_concurrent_requests,
                                                    metrics), on_fatal=on_fatal)
    starter = start_runtime or _default_starter

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(state, starter), name="sbon-start")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if state.runtime is not None:
                await state.runtime.close()
                state.runtime = None
            logger.info("server stopped")

    app = FastAPI(title="SoftBoN Serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible soft best-of-n decoding.")
    app.state.sbon = state
    metrics.engine_requests.set_function(
        lambda: float(state.runtime.backend.num_unfinished_requests()) if state.runtime else 0.0)
    install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


async def _start(state: ServerState, starter: RuntimeStarter) -> None:
    started = time.perf_counter()
    logger.info("starting the engine and rewards",
                extra={"settings": non_default_values(state.config)})
    try:
        state.runtime = await starter(state.config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.failure = f"{type(exc).__name__}: {exc}"
        logger.exception("the engine or a reward model failed to start")
        if state.on_fatal is not None:
            state.on_fatal()
        return
    logger.info("ready", extra={"model": state.config.model.public_name,
                                "start_s": round(time.perf_counter() - started, 1)})


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="200 when the engine and reward models are ready, else 503")
    async def health() -> Response:
        runtime = state.runtime
        if runtime is None or not getattr(runtime.backend, "ready", True):
            message = ("The server failed to start." if state.failure
                       else "The model is still loading.")
            return error_response(Unavailable(message, None, "not_ready"))
        return JSONResponse({"status": "ok", "model": state.config.model.public_name})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        _authorize(state, request)
        return ModelList(data=[ModelCard(id=state.config.model.public_name,
                                         created=state.started_at)])

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(state, body, request)

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, body, request)


def _authorize(state: ServerState, request: Request) -> None:
    """With ``server.api_key`` set, /v1/* needs ``Authorization: Bearer <key>`` (401 else)."""
    secret = state.config.server.api_key
    if secret is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             secret.get_secret_value().encode()):
        raise Unauthorized("Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                           None, "invalid_api_key")


async def _serve(state: ServerState, body: AnyRequest, request: Request) -> Response:
    _authorize(state, request)
    service = CompletionService(state.config, require_ready(state.runtime), state.metrics)
    plan = service.plan(body, request.state.request_id, request.state.arrived)
    release = state.admission.acquire()

    def finish() -> None:
        release()
        state.metrics.phase_seconds.labels("total").observe(time.perf_counter() - plan.arrived)

    prefix = "chatcmpl" if plan.kind == "chat" else "cmpl"
    response_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    model = state.config.model.public_name
    if body.stream:
        writer = ChunkWriter(plan.kind, response_id, created, model, plan.include_usage)
        return SlotStreamingResponse(service.stream(plan, writer), finish)
    try:
        choices = await until_disconnected(service.complete(plan), request.is_disconnected)
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


class SlotStreamingResponse(StreamingResponse):
    """An event stream that gives its concurrency slot back however the stream ends."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class RequestContextMiddleware:
    """Request ids (``X-Request-Id`` honoured or made), request metrics and the access log."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        arrived = time.perf_counter()
        scope.setdefault("state", {}).update(request_id=request_id, arrived=arrived)
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._account(scope, status["code"], request_id, arrived)

    def _account(self, scope: Scope, status: int, request_id: str, arrived: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if path not in ("/health", "/metrics"):
            logger.info("request", extra={
                "request_id": request_id, "method": scope.get("method"), "path": endpoint,
                "status": status, "duration_s": round(time.perf_counter() - arrived, 4)})


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == REQUEST_ID_HEADER:
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def run_server(config: AppConfig) -> int:
    """Serve until interrupted; exit code 1 when the engine or a reward failed to start."""
    import uvicorn

    from server.logs import configure_logging

    configure_logging(config.server.log_level, config.server.log_json)
    failed = {"value": False}
    holder: dict[str, Any] = {}

    def fatal() -> None:
        failed["value"] = True
        holder["server"].should_exit = True

    app = create_app(config, on_fatal=fatal)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_config=None,
        access_log=False, timeout_graceful_shutdown=30))
    holder["server"] = server
    server.run()
    return 1 if failed["value"] else 0
