"""Fixtures of the end-to-end tier (defined in ``live_server``)."""

from live_server import live_server

__all__ = ["live_server"]
