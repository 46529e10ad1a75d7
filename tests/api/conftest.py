"""Fixtures of the API tier (defined in ``api_harness``)."""

from api_harness import served, server_factory

__all__ = ["served", "server_factory"]
