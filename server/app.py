"""The FastAPI app: factory, lifespan, middleware and thin routes; ``run_server`` for uvicorn.

The lifespan starts the engine and reward scorers in the background, so ``/health`` answers
503 while they load and 200 once they are ready, watches the engine and the rewards, and
closes everything on shutdown (server/lifecycle.py). Tests inject a runtime starter (fakes)
through :func:`create_app`. Each completion route hands its request to the one
:class:`~server.serving.CompletionService` built here; the schemas live in
:mod:`server.protocol`, the per-request limits in :mod:`server.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from common.config import AppConfig
from server import lifecycle
from server.body_parsing import off_loop_route
from server.datalog import DataLog
from server.errors import Unavailable, error_response, install_error_handlers
from server.lifecycle import RuntimeStarter, ServerState, serving_runtime
from server.metrics import CONTENT_TYPE, Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.planning import ServingRuntime
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.serving import Admission, CompletionService

__all__ = ["ServerState", "create_app", "run_server"]

logger = logging.getLogger("sbon.server")

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
    service = CompletionService(config, metrics, state.admission, state.abort,
                                runtime=lambda: serving_runtime(state),
                                draining=lambda: state.stopping, encoder=state.encoder)
    starter = start_runtime or _default_starter

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.warn_if_exposed(config)
        if config.datalog.enabled:  # a folder that cannot be written fails the start
            state.datalog = DataLog(config.datalog, metrics)
            state.datalog.start()
            service.datalog = state.datalog
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
    # Bodies validated off the event loop, oversized ones refused before their parts are.
    app.router.route_class = off_loop_route({"limits": limits})
    _add_routes(app, state, service)
    # Added innermost first: context (outermost), then the key, then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes,
                       timeout_s=limits.body_timeout_s)
    key = config.server.api_key
    app.add_middleware(APIKeyMiddleware, api_key=key.get_secret_value() if key else None)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def _add_routes(app: FastAPI, state: ServerState, service: CompletionService) -> None:
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
        return await service.serve(body, request)

    @app.post("/v1/chat/completions",
              responses={200: {"model": ChatCompletionResponse}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.serve(body, request)


def _health(state: ServerState) -> Response:
    """200 with each reward's state once serving (``degraded`` when a reward is failing);
    503 while loading, after a failed start, with a dead engine, while draining, and when
    the default reward is dead (lifecycle.default_reward_dead), with the rewards' states."""
    try:
        runtime = serving_runtime(state)
    except Unavailable as exc:
        if exc.code in ("engine_loading", "start_failed"):
            message = ("The server failed to start." if state.failure
                       else "The model is still loading.")
            exc = Unavailable(message, None, "not_ready")
        if state.runtime is None or exc.code != "reward_dead":
            return error_response(exc)
        return _unhealthy(exc, state.runtime)
    rewards = {name: scorer.status() for name, scorer in runtime.sbon.scorers.items()}
    dead = lifecycle.default_reward_dead(state, runtime)
    if dead is not None:
        return _unhealthy(Unavailable(f"The default reward '{dead}' cannot score.", None,
                                      "reward_dead"), runtime)
    degraded = any(r["state"] != "ok" for r in rewards.values())
    return JSONResponse({"status": "degraded" if degraded else "ok",
                         "model": state.config.model.public_name, "rewards": rewards})


def _unhealthy(error: Unavailable, runtime: ServingRuntime) -> Response:
    """A dead reward's 503 for /health, with the rewards' states beside the error."""
    rewards = {name: scorer.status() for name, scorer in runtime.sbon.scorers.items()}
    return JSONResponse({**error.body(), "rewards": rewards}, status_code=error.status)


def run_server(config: AppConfig) -> int:
    """Serve until SIGTERM (exit 0), or until the engine fails to start or dies (exit 1)."""
    return lifecycle.run_server(config, create_app)
