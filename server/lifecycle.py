"""The server's life: start in the background, watch the engine, drain on shutdown, exit.

- Start: the engine and rewards load in a background task, so ``/health`` answers 503
  while they load (engine construction runs in a worker thread, off the event loop).
- Engine death: a watchdog checks the engine and every reward every
  ``server.engine_check_s``; when the generator or a reward's engine or worker has died,
  every request still running is answered with a 503, then the process exits non-zero so
  that Docker or Kubernetes restart it (vLLM's own server does the same).
- Shutdown (SIGTERM): new requests get 503 and the listener closes; requests in flight may
  finish for up to ``server.drain_s``; whatever still runs then is ended with a 503 (an
  error frame and ``[DONE]`` for streams), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI

from common.config import AppConfig, config_warnings, non_default_values
from server.datalog import DataLog
from server.errors import Unavailable
from server.metrics import Metrics
from server.planning import ServingRuntime
from server.serving import Admission
from server.stopping import AbortSignal

logger = logging.getLogger("sbon.server")

RuntimeStarter = Callable[[AppConfig], Awaitable[ServingRuntime]]
ABORT_GRACE_S = 10.0  # after the drain: time for aborted requests to send their errors
FATAL_GRACE_S = 10.0  # after engine death: time for in-flight requests to get their 503


@dataclass
class ServerState:
    """Everything one app holds: configuration, metrics, admission, the runtime once started,
    and where the server is in its life."""

    config: AppConfig
    metrics: Metrics
    admission: Admission
    runtime: ServingRuntime | None = None
    failure: str | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    on_fatal: Callable[[], None] | None = None
    abort: AbortSignal = field(default_factory=AbortSignal)
    stopping: bool = False  # a shutdown is draining: no new requests
    engine_dead: bool = False  # the generator or a reward died: the process is exiting
    death: Unavailable | None = None  # what requests get meanwhile
    # Prompts are tokenised here, one at a time (tokenizers are not re-entrant).
    encoder: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="sbon-tokenize"))
    datalog: DataLog | None = None  # the distillation log's writer, when enabled


def engine_dead_error() -> Unavailable:
    return Unavailable("The generation engine stopped; the server is restarting.", None,
                       "engine_dead")


def shutting_down_error() -> Unavailable:
    return Unavailable("The server is shutting down; retry shortly.", None,
                       "server_shutting_down")


def serving_runtime(state: ServerState) -> ServingRuntime:
    """The runtime to serve a request with, or the 503 that says why there is none."""
    if state.stopping:
        raise shutting_down_error()
    if state.engine_dead:
        raise state.death or engine_dead_error()
    runtime = state.runtime
    if runtime is None:
        if state.failure:
            raise Unavailable("The server failed to start.", None, "start_failed")
        raise Unavailable("The model is still loading; retry shortly.", None, "engine_loading")
    if not runtime.backend.ready:
        raise Unavailable("The generation engine is unavailable.", None, "engine_unavailable")
    return runtime


def warn_if_exposed(config: AppConfig) -> None:
    """A listener reachable from other machines without a key is worth a warning."""
    if not config.server.loopback and config.server.api_key is None:
        logger.warning("listening on a non-loopback address without an API key: anyone who "
                       "can reach it can use the model; set SBON_SERVER__API_KEY",
                       extra={"host": config.server.host})
    for message in config_warnings(config):
        logger.warning(message)


async def start_in_background(state: ServerState, starter: RuntimeStarter) -> None:
    """Build the runtime; a failure is logged, kept for /health, and fatal."""
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
    # The engine, models and libraries are long-lived: out of the collector's reach, a full
    # collection (which a large request body can trigger) no longer scans their millions of
    # objects while holding the GIL, a pause of up to a second for every other request.
    gc.freeze()
    logger.info("ready", extra={"model": state.config.model.public_name,
                                "start_s": round(time.perf_counter() - started, 1)})


def reward_dead_error(name: str) -> Unavailable:
    return Unavailable(f"The reward '{name}' stopped; the server is restarting.",
                       "sbon.reward", "reward_dead")


def dead_part(runtime: ServingRuntime) -> tuple[str, Unavailable, BaseException | None] | None:
    """What has died for good (the generator, or a reward's engine or worker): its name,
    the error requests get, and the cause where the part knows it; None while all live."""
    backend = runtime.backend
    if not backend.ready:
        return "the generation engine", engine_dead_error(), backend.dead_error
    for name, scorer in runtime.sbon.scorers.items():
        if not scorer.healthy:
            return f"the reward '{name}'", reward_dead_error(name), None
    return None


def default_reward_dead(state: ServerState, runtime: ServingRuntime) -> str | None:
    """The default reward's name when it cannot serve: its engine died, or it failed
    ``server.reward_dead_after_failures`` times in a row; None otherwise."""
    name = runtime.sbon.default_reward
    scorer = runtime.sbon.scorers[name]
    limit = state.config.server.reward_dead_after_failures
    if not scorer.healthy or 0 < limit <= scorer.health.consecutive_failures:
        return name
    return None


async def watch_engine(state: ServerState) -> None:
    """Poll the engine's and the rewards' health; on a death answer everyone with 503,
    then exit."""
    while True:
        await asyncio.sleep(state.config.server.engine_check_s)
        runtime = state.runtime
        dead = dead_part(runtime) if runtime is not None else None
        if dead is not None:
            break
    what, error, cause = dead
    state.engine_dead, state.death = True, error
    state.failure = f"{what} died"
    logger.error(f"{what} died; answering requests in flight with 503, then exiting",
                 extra={"in_flight": state.admission.in_flight,
                        "cause": f"{type(cause).__name__}: {cause}" if cause else None})
    state.abort.trigger(error)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FATAL_GRACE_S
    while state.admission.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.on_fatal is not None:
        state.on_fatal()


def begin_drain(state: ServerState) -> None:
    """Refuse new requests; end the ones still running after ``server.drain_s``."""
    if state.stopping:
        return
    state.stopping = True
    drain_s = state.config.server.drain_s
    logger.info("shutting down: finishing requests in flight",
                extra={"in_flight": state.admission.in_flight, "drain_s": drain_s})
    asyncio.get_running_loop().call_later(drain_s, _end_drain, state)


def _end_drain(state: ServerState) -> None:
    if state.admission.in_flight:
        logger.warning("drain time is over; stopping the requests still in flight",
                       extra={"in_flight": state.admission.in_flight})
    state.abort.trigger(shutting_down_error())


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app when its graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.sbon_state = state

    async def shutdown(self, sockets: Any = None) -> None:
        begin_drain(self.sbon_state)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except that a SIGTERM served as a graceful shutdown is not raised
        again afterwards: the process exits with its own code (0 after a clean drain), as
        container runtimes expect of a clean stop."""
        with super().capture_signals():
            yield
            captured: list[int] = getattr(self, "_captured_signals", [])
            captured[:] = [s for s in captured if s != signal.SIGTERM]


def build_server(app: FastAPI, host: str, port: int) -> DrainingServer:
    """The uvicorn server for ``app``, with a graceful-shutdown window past the drain."""
    state: ServerState = app.state.sbon
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(state.config.server.drain_s + ABORT_GRACE_S))
    return DrainingServer(config, state)


def run_server(config: AppConfig, app_factory: Callable[..., FastAPI]) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the engine fails to start or dies
    (exit 1)."""
    from server.logs import configure_logging

    configure_logging(config.server.log_level, config.server.log_json)
    failed = False
    server: DrainingServer | None = None

    def fatal() -> None:
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    app = app_factory(config, on_fatal=fatal)
    server = build_server(app, config.server.host, config.server.port)
    server.run()
    if failed:
        # The app has shut down: requests answered, data log written, engines closed. What a
        # dead engine leaves behind (threads, child processes) can hold the interpreter's own
        # exit for tens of seconds; the restart must not wait for it.
        logging.shutdown()
        os._exit(1)
    return 0
