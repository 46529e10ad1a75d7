"""Request bodies parsed and validated in a worker thread, never on the event loop.

FastAPI reads a JSON body and validates it against the route's model on the event loop. A
body within the size limit can still hold 150,000 chat content parts, which take seconds to
validate, and every other request, ``/health`` included, would wait that long. Routes of
:class:`OffLoopBodyRoute` keep their declared body model (so the OpenAPI document is
unchanged) but parse and validate it in a thread; errors are FastAPI's
``RequestValidationError``, answered with the same 400 as before (server/errors.py).
Decoding holds the GIL, so a body whose structure could be costly to decode is first
validated in a worker process (:func:`value_bound`), and only decoded here if it passes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from server.errors import InvalidRequest
from server.limits import check_request_size
from server.planning import refuse_unsupported
from server.protocol import ChatCompletionRequest, CompletionRequest

# Bodies whose value bound is at most this many are decoded in the serving process: about
# 15 ms for the slowest shape (empty lists, ~0.14 us each); 2 MiB of them take ~100 ms.
IN_PROCESS_VALUES = 100_000


def value_bound(raw: bytes) -> int:
    """An upper bound on the number of JSON values and keys in ``raw``, without decoding it.

    Outside strings, every value but the outermost follows a ``[`` (first element), a ``,``
    (later elements and members) or a ``:`` (member values), and every key follows ``{`` or
    ``,``. Escapes act inside strings only, and these bytes counted inside strings can only
    raise the bound. Counting 2 MiB takes about 2 ms. (Counting ``"type"`` would not bound the
    content parts: a key may be written ``"\\u0074ype"``.)
    """
    return 1 + raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")


def value_count(data: Any) -> int:
    """The exact number of values and keys in decoded JSON (``value_bound`` on its text)."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            count += len(value)
            stack.extend(value.values())
    return count


def first_error(model: type[BaseModel], raw: bytes,
                context: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The first error of ``raw`` (what server/errors.py answers with), or None.

    Runs in a worker process: only the small error travels back, not the decoded body. A
    body that validates but holds more than IN_PROCESS_VALUES values is also put through
    the serving layer's checks of unsupported fields and sizes (a ``logit_bias`` of 700,000
    empty lists validates, and takes 400 ms to decode and validate), so that the serving
    process decodes only bodies that the limits allow.
    """
    try:
        request = parse_body(model, raw, context)
    except RequestValidationError as exc:
        first = exc.errors()[0]
        return {"type": first.get("type", ""), "loc": tuple(first.get("loc", ())),
                "msg": str(first.get("msg", ""))}
    limits = (context or {}).get("limits")
    if limits is None or not isinstance(request, CompletionRequest | ChatCompletionRequest) \
            or value_count(json.loads(raw)) <= IN_PROCESS_VALUES:
        return None
    try:
        refuse_unsupported(request)
        check_request_size(request, limits)
    except InvalidRequest as exc:
        return {"invalid_request": (exc.message, exc.param, exc.code)}
    return None


def parse_body(model: type[BaseModel], raw: bytes,
               context: dict[str, Any] | None = None) -> BaseModel:
    """``raw`` as an instance of ``model``, or a RequestValidationError as FastAPI raises.

    ``context`` is pydantic's validation context: the server's limits, which let a model
    refuse an oversized body before validating its parts.
    """
    try:
        data = json.loads(raw)
    # JSONDecodeError is a ValueError; nesting deeper than the interpreter's recursion limit
    # (100,000 "[" fit in a small body) is a RecursionError.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "JSON decode error", "input": {},
                                       "ctx": {"error": type(exc).__name__}}]) from None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


class OffLoopBodyRoute(APIRoute):
    """An APIRoute whose one body model is validated in a worker thread.

    It serves endpoints of the form ``async def f(body: Model, request: Request)``; any other
    route (no body, or other parameters) is handled by FastAPI as usual.
    """

    validation_context: dict[str, Any] | None = None
    # One thread: json.loads holds the GIL for the whole body (about 75 ms for 4 MB), so
    # parsing several bodies at once would only make the event loop wait behind each of them.
    parser: Executor | None = None
    checker: _LazyProcessPool | None = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        names = {p.name for p in dependant.path_params + dependant.query_params
                 + dependant.header_params + dependant.cookie_params}
        model = _body_model(self)
        if model is None or names or dependant.dependencies or not dependant.request_param_name:
            return super().get_route_handler()
        body_name = dependant.body_params[0].name
        request_name = dependant.request_param_name
        endpoint, context, parser = self.endpoint, self.validation_context, self.parser
        checker = self.checker

        async def handler(request: Request) -> Response:
            raw = await request.body()
            if checker is not None and value_bound(raw) > IN_PROCESS_VALUES:
                error = await checker.first_error(model, raw, context)
                if error is not None and "invalid_request" in error:
                    raise InvalidRequest(*error["invalid_request"])
                if error is not None:
                    raise RequestValidationError([error])
            body = await asyncio.get_running_loop().run_in_executor(
                parser, functools.partial(parse_body, model, raw, context))
            response: Response = await endpoint(**{body_name: body, request_name: request})
            return response

        return handler


def off_loop_route(context: dict[str, Any]) -> type[OffLoopBodyRoute]:
    """The route class of one app: ``context`` (the server's limits) for every validation,
    and the app's own parsing thread."""
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbon-parse")
    return type("ContextOffLoopBodyRoute", (OffLoopBodyRoute,),
                {"validation_context": dict(context), "parser": parser,
                 "checker": _LazyProcessPool()})


class _LazyProcessPool:
    """One worker process, started on the first body that needs it ("spawn": forking a
    serving process that runs engine threads could copy a held lock into the child)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def first_error(self, model: type[BaseModel], raw: bytes,
                          context: dict[str, Any] | None) -> dict[str, Any] | None:
        """:func:`first_error` in the worker process; None (parse here, as for any body) if
        the worker died, which is replaced on the next call."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(first_error, model, raw, context))
        except BrokenProcessPool:
            self._pool = None
            return None


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    params = route.dependant.body_params
    if len(params) != 1:
        return None
    annotation = params[0].field_info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
