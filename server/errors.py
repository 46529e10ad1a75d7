"""One error shape for every failure: OpenAI's ``{"error": {message, type, param, code}}``.

Typed exceptions are mapped to status codes here and nowhere else: 400 invalid request
(FastAPI's validation errors included), 401 missing key, 404 unknown model or reward, 413
body too large, 429 overloaded (with Retry-After), 503 engine or reward unavailable, loading
or shutting down, 504 past the request's deadline, 500 with a generic message and the
traceback in the log. Messages never carry text that JSON cannot encode.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.backend import BackendError, InvalidGenerationRequest
from engine.guarded import RewardFailure
from engine.sbon import UnknownRewardError
from reward.base import RewardError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = well_formed(message)
        self.param = well_formed(param) if param is not None else None
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str] | None:
        """Extra response headers (Retry-After on 429)."""
        return None


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class RequestTimeout(APIError):
    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    retry_after_s = 1  # the work in flight frees capacity within seconds

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(APIError):
    status = 503
    type = "service_unavailable_error"


class DeadlineExceeded(APIError):
    status = 504
    type = "timeout_error"


class InternalError(APIError):
    status = 500
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def well_formed(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8 cannot encode) replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def reward_error(exc: RewardFailure) -> Unavailable:
    """A failed reward as the client sees it: the reward named, the cause only in the log."""
    messages = {
        "timeout": f"The reward '{exc.reward}' did not answer in time.",
        "invalid": f"The reward '{exc.reward}' returned a value that is not a finite number.",
        "error": f"The reward '{exc.reward}' is unavailable.",
    }
    codes = {"timeout": "reward_timeout", "invalid": "reward_invalid",
             "error": "reward_unavailable"}
    return Unavailable(messages[exc.kind], "sbon.reward", codes[exc.kind])


def to_api_error(exc: BaseException) -> APIError:
    """The API error for any exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownRewardError):
        name = exc.args[0] if exc.args else ""
        return NotFound(f"The reward '{name}' is not configured.", "sbon.reward",
                        "reward_not_found")
    if isinstance(exc, InvalidGenerationRequest):
        return InvalidRequest(str(exc), exc.param, "invalid_generation_request")
    if isinstance(exc, BackendError):
        return Unavailable("The generation engine is unavailable.", None, "engine_unavailable")
    if isinstance(exc, RewardFailure):
        return reward_error(exc)
    if isinstance(exc, RewardError):
        return Unavailable("The reward model is unavailable.", "sbon.reward",
                           "reward_unavailable")
    logger.error("unhandled error while serving a request", exc_info=exc)
    return InternalError("The server had an error while processing the request.")


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status,
                        headers={**(error.headers() or {}), **(headers or {})})


def sse_error_frame(error: APIError) -> str:
    """An error inside an already started event stream."""
    return f"data: {json.dumps(error.body())}\n\n"


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Union members add their type name to the location; keep the field path only.
    loc = [p for p in loc if not p.startswith(("list[", "str", "int", "function-"))]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param,
                              "unsupported_parameter")
    if kind == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", None, "invalid_json")
    if kind == "limit_exceeded":  # counted before validation (server/body_parsing.py)
        return InvalidRequest(f"{param}: {first.get('msg')}", param, "limit_exceeded")
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{param}: {message}"
    return InvalidRequest(message, param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception class to the OpenAI envelope."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = {404: NotFound, 405: InvalidRequest}.get(exc.status_code, InvalidRequest)
        error = error_type(str(exc.detail))
        error.status = exc.status_code
        return error_response(error, headers=getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for known in (APIError, UnknownRewardError, InvalidGenerationRequest, BackendError,
                  RewardError):
        app.add_exception_handler(known, on_api_error)
    # The last resort: a generic 500 (the traceback goes to the log, not to the client).
    app.add_exception_handler(Exception, on_api_error)
