"""Request bodies parsed and validated in a worker thread, never on the event loop.

FastAPI reads a JSON body and validates it against the route's model on the event loop. A
body within the size limit can still hold 150,000 chat content parts, which take seconds to
validate, and every other request, ``/health`` included, would wait that long. Routes of
:class:`OffLoopBodyRoute` keep their declared body model (so the OpenAPI document is
unchanged) but parse and validate it in a thread; errors are FastAPI's
``RequestValidationError``, answered with the same 400 as before (server/errors.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response


def parse_body(model: type[BaseModel], raw: bytes,
               context: dict[str, Any] | None = None) -> BaseModel:
    """``raw`` as an instance of ``model``, or a RequestValidationError as FastAPI raises.

    ``context`` is pydantic's validation context: the server's limits, which let a model
    refuse an oversized body before validating its parts.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
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

        async def handler(request: Request) -> Response:
            raw = await request.body()
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
                {"validation_context": dict(context), "parser": parser})


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    params = route.dependant.body_params
    if len(params) != 1:
        return None
    annotation = params[0].field_info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
