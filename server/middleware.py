"""The ASGI middleware every request passes, outermost first: context, key, body size.

Request context (request ids, request metrics, the access log), then the API key (checked
before any byte of the body is read, in constant time), then the body limit (413 before
parsing: a body is counted as it streams in, and one over the limit is never stored or
parsed; the rest of a moderately oversized body is read and dropped first, so that the
client, still sending, can read the 413; a declared Content-Length far over the limit is
refused at once). All of them answer with OpenAI's error envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge, RequestTimeout, Unauthorized, error_response
from server.metrics import Metrics

logger = logging.getLogger("sbon.server")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
OPEN_PATHS = frozenset({"/health"})  # probes need no key
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DISCARD_FACTOR = 8  # bodies up to this many times the limit are drained before the 413
DISCARD_TIMEOUT_S = 10.0


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
        # Event-loop time: the one clock a request's deadline and durations are read on.
        arrived = asyncio.get_running_loop().time()
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
        duration_s = asyncio.get_running_loop().time() - arrived
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if path not in ("/health", "/metrics"):
            logger.info("request", extra={
                "request_id": request_id, "method": scope.get("method"), "path": endpoint,
                "status": status, "duration_s": round(duration_s, 4)})


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == REQUEST_ID_HEADER:
            candidate: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


class APIKeyMiddleware:
    """With a key configured, every path but ``/health`` needs ``Authorization: Bearer <key>``.

    Checked before the body is read, so an unauthenticated client costs no parsing. The
    comparison is of SHA-256 digests with :func:`hmac.compare_digest`: its time depends on
    neither the key's content nor its length.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self._digest is None or scope["type"] != "http"
                or scope.get("path", "") in OPEN_PATHS or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        error = Unauthorized("Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                             None, "invalid_api_key")
        response = error_response(error, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self._digest is not None
        raw = _header(scope, b"authorization") or b""
        scheme, _, token = raw.decode("latin-1").partition(" ")
        offered = hashlib.sha256(token.strip().encode("latin-1")).digest()
        return hmac.compare_digest(offered, self._digest) and scheme.lower() == "bearer"


class BodyLimitMiddleware:
    """Requests whose body exceeds ``limit`` bytes get a 413 before anything parses them,
    and those whose body has not fully arrived after ``timeout_s`` seconds a 408."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.strip().isdigit()
                                     or int(declared) > self.limit):
            if declared.strip().isdigit() and int(declared) <= self.limit * DISCARD_FACTOR:
                await _discard(receive, self.limit * DISCARD_FACTOR)
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        await self.app(scope, _replay(b"", message, receive), send)
                        return
                    body += message.get("body", b"")
                    more = bool(message.get("more_body", False))
                    if len(body) > self.limit:
                        if more:
                            await _discard(receive, self.limit * DISCARD_FACTOR - len(body))
                        await self._refuse(scope, receive, send)
                        return
                    if not more:
                        break
        except TimeoutError:
            await self._too_slow(scope, receive, send, len(body))
            return
        await self.app(scope, _replay(bytes(body), None, receive), send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send, got: int) -> None:
        error = RequestTimeout(f"The request body did not arrive within {self.timeout_s:g} s "
                               f"({got} bytes received; limits.body_timeout_s).", None,
                               "body_timeout")
        await error_response(error, {"Connection": "close"})(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"The request body is larger than {self.limit} bytes "
                                "(limits.max_body_bytes).", None, "body_too_large")
        # The rest of the body is never read: the connection cannot be reused.
        response = error_response(error, {"Connection": "close"})
        await response(scope, receive, send)


async def _discard(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a body (at most ``budget`` bytes, for a bounded time)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


def _replay(body: bytes, first: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that hands out the buffered body once, then the client's own events."""
    pending: list[Message] = [first] if first is not None else [
        {"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
