"""``sbon serve-ray``: the server as Ray Serve replicas behind Ray's HTTP proxy.

The options become :class:`server.replicas.ReplicaSettings` (bounded; a bad value is a usage
error naming it). Needs the ``ray`` extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError


def add_serve_ray_command(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]
                          ) -> None:
    """Register the subcommand on the ``sbon`` parser's subparsers."""
    parser = sub.add_parser("serve-ray", help="run the server as Ray Serve replicas")
    add_config_args(parser)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--replicas", type=int, default=1, help="a fixed number of replicas")
    parser.add_argument("--min-replicas", type=int,
                        help="autoscaling: fewest replicas (with --max-replicas)")
    parser.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    parser.add_argument("--target-ongoing-requests", type=float, default=4.0,
                        help="autoscaling: requests in flight per replica to aim for")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--address", help="a Ray cluster's address (default: $RAY_ADDRESS, "
                        "else a local Ray started by the command)")
    parser.set_defaults(handler=serve_ray)


def replica_settings(args: argparse.Namespace) -> Any:
    """The validated settings, or ``ValueError`` naming the bad option."""
    from server.replicas import ReplicaSettings

    fields = {name: getattr(args, name) for name in (
        "replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
        "cpus_per_replica", "gpus_per_replica", "address")}
    try:
        return ReplicaSettings.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-")
        raise ValueError(f"{option if first['loc'] else 'serve-ray'}: {first['msg']}") from None


def serve_ray(args: argparse.Namespace, load_config: Callable[..., Any]) -> int:
    settings = replica_settings(args)
    extra = []
    if args.host:
        extra.append(f"server.host={args.host}")
    if args.port is not None:
        extra.append(f"server.port={args.port}")
    config = load_config(args, extra)
    from server.replicas import run_replicas

    return run_replicas(config, settings)
