"""Replicas of the server on Ray Serve: the FastAPI app is each replica's ingress.

Each replica owns its engine and rewards and starts them in its constructor, so Ray routes
requests only to replicas that are ready; a dead engine fails Ray's health check and Ray
replaces the replica. Responses carry ``X-SBON-Replica`` so clients and tests can tell which
replica served them. ``sbon serve-ray`` runs it (README, "Scale out"); KubeRay runs the same
application on Kubernetes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import AppConfig

logger = logging.getLogger("sbon.server")

REPLICA_HEADER = "x-sbon-replica"
APP_NAME = "softbon-serve"
# Library settings the replicas take from the command's environment (Ray workers start
# from the raylet's). Not secrets: Ray shows a runtime environment to anyone who can list
# actors, so a token such as HF_TOKEN must be in the nodes' own environment.
PASSED_ENV_PREFIXES = ("HF_HUB_", "HF_HOME", "TRANSFORMERS_", "VLLM_")


class ReplicaSettings(BaseModel):
    """How many replicas, and what each one may use. Fixed ``replicas`` or autoscaling
    between ``min_replicas`` and ``max_replicas`` on requests in flight per replica."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(default=1, ge=1, le=512)
    min_replicas: int | None = Field(default=None, ge=0, le=512)
    max_replicas: int | None = Field(default=None, ge=1, le=512)
    target_ongoing_requests: float = Field(default=4.0, gt=0.0, le=4096.0)
    cpus_per_replica: float = Field(default=1.0, gt=0.0, le=1024.0)
    gpus_per_replica: float = Field(default=0.0, ge=0.0, le=64.0)
    address: str | None = Field(default=None, min_length=1, max_length=512)

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> ReplicaSettings:
        bounds = (self.min_replicas, self.max_replicas)
        if (bounds[0] is None) != (bounds[1] is None):
            raise ValueError("min_replicas and max_replicas go together (autoscaling)")
        if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


def passed_environment(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(PASSED_ENV_PREFIXES)}


def deployment_options(config: AppConfig, settings: ReplicaSettings,
                       environ: dict[str, str]) -> dict[str, Any]:
    """Ray Serve deployment options: the replica count or autoscaling, a per-replica cap of
    requests equal to the server's own (``limits.max_concurrent_requests``, so admission
    and 429s stay the app's), and a shutdown window past the drain."""
    options: dict[str, Any] = {
        "name": "SoftBoNReplica",
        "max_ongoing_requests": config.limits.max_concurrent_requests,
        "health_check_period_s": max(1.0, config.server.engine_check_s),
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": config.server.drain_s + 5.0,
        "ray_actor_options": {
            "num_cpus": settings.cpus_per_replica,
            "num_gpus": settings.gpus_per_replica,
            "runtime_env": {"env_vars": passed_environment(environ)},
        },
    }
    if settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = settings.replicas
    return options


class ReplicaHeader:
    """ASGI wrapper adding ``X-SBON-Replica: <replica id>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica.encode())

    def __getattr__(self, name: str) -> Any:  # Ray Serve reads the app's attributes
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, tagged)


class SoftBoNReplica:
    """One replica: its runtime is started before Ray sends it any request."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._fatal = False
        self._state: Any = None

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        """Ray Serve's late-bound ingress: start the engine and rewards (the replica is
        ready only when this returns), then build the app over them."""
        from ray import serve

        from engine.runtime import start_runtime
        from server.app import create_app
        from server.logs import configure_logging

        configure_logging(self._config.server.log_level, self._config.server.log_json)
        runtime = await start_runtime(self._config)

        async def started(_: AppConfig) -> Any:
            return runtime

        app = create_app(self._config, start_runtime=started, on_fatal=self._on_fatal)
        self._state = app.state.sbon
        replica = serve.get_replica_context().replica_id.unique_id
        return ReplicaHeader(app, replica)

    def _on_fatal(self) -> None:
        self._fatal = True

    def check_health(self) -> None:
        """Ray's health check: a failing one makes Ray replace this replica."""
        if self._fatal or (self._state is not None and self._state.engine_dead):
            raise RuntimeError(self._state.failure if self._state else "engine failed")


def build_application(config: AppConfig, settings: ReplicaSettings) -> Any:
    """The Ray Serve application: ``SoftBoNReplica`` as an ingress deployment."""
    from ray import serve

    ingress = serve.ingress()(SoftBoNReplica)
    deployment: Any = serve.deployment(ingress, **deployment_options(config, settings,
                                                                     dict(os.environ)))
    return deployment.bind(config)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder, for ``serve run`` and KubeRay's ``serveConfigV2``
    (``import_path: server.replicas:app_builder``): ``args`` holds ``config`` (a file) and
    any :class:`ReplicaSettings` field."""
    from common.config import load_config

    options = dict(args)
    config = load_config(options.pop("config", None), [])
    return build_application(config, ReplicaSettings.model_validate(options))


def run_replicas(config: AppConfig, settings: ReplicaSettings) -> int:
    """Start the replicas behind Ray Serve's HTTP proxy on ``server.host:server.port``, and
    serve until SIGTERM or SIGINT (exit 0)."""
    import ray
    from ray import serve

    from server.logs import configure_logging

    configure_logging(config.server.log_level, config.server.log_json)
    ray.init(address=settings.address, namespace=APP_NAME)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        serve.run(build_application(config, settings), name=APP_NAME, route_prefix="/")
        logger.info("replicas ready", extra={"port": config.server.port})
        stop.wait()
        serve.delete(APP_NAME)
    finally:
        stop_serve: Any = serve.shutdown  # untyped in Ray
        stop_serve()
        ray.shutdown()
    return 0
