"""The two hot routes, served without FastAPI's routing and dependency machinery.

``POST /v1/jobs`` and ``GET /v1/jobs/{id}`` are most of the traffic, and at a thousand
jobs a second the framework's per-request routing, dependency solving and middleware
layers cost more CPU than the work itself. This ASGI layer recognises exactly those two
requests, parses them the way FastAPI would (same body model, same header and query
constraints), and calls the very functions the FastAPI routes call; every error goes
through the app's own exception handlers, so status codes and bodies are identical.
Everything else, and the OpenAPI description of these routes, stays with FastAPI.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import authorize
from api.routes.jobs import IDEMPOTENCY_KEY_MAX, WAIT_MAX_S, read_job, submit
from api.schemas import JobCreate

__all__ = ["FastPath", "BodyTooLargeError"]


class BodyTooLargeError(Exception):
    """Raised from ``receive`` once a body passes INFERQ_MAX_BODY_BYTES; the body-limit
    middleware has already answered 413 and catches it."""


_JOBS = "/v1/jobs"
#: The FastAPI routes' own limits (``api.routes.jobs``), checked the same way.
_WAIT: TypeAdapter[float] = TypeAdapter(Annotated[float, Field(ge=0, le=WAIT_MAX_S)])
_KEY: TypeAdapter[str] = TypeAdapter(Annotated[str, Field(max_length=IDEMPOTENCY_KEY_MAX)])
_PREFIX = "/v1/jobs/"


def _is_uuid(text: str) -> bool:
    if len(text) != 36:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class FastPath:
    """ASGI middleware, innermost of the app's own: ``api`` lends its exception handlers."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        # Only for the request metrics' route label (see ObserveMiddleware).
        self._submit_route = SimpleNamespace(path=_JOBS)
        self._read_route = SimpleNamespace(path=_JOBS + "/{job_id}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == _JOBS:
                scope["route"] = self._submit_route
                return await self._serve(self._submit, scope, receive, send)
            # Only a job id: any other path under /v1/jobs/ is FastAPI's (a route added
            # there is served, never taken for an id). A malformed id is FastAPI's too,
            # which answers it the same 404.
            if method == "GET" and path.startswith(_PREFIX) and _is_uuid(path[len(_PREFIX) :]):
                scope["route"] = self._read_route
                return await self._serve(self._read, scope, receive, send)
        await self.app(scope, receive, send)

    async def _serve(self, handler: Any, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except BodyTooLargeError:
            raise
        except Exception as exc:
            response = await self._handle(request, exc)
        await response(scope, receive, send)

    async def _handle(self, request: Request, exc: Exception) -> Any:
        for cls in type(exc).__mro__:
            handler = self.api.exception_handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)  # type: ignore[misc]
        raise exc

    async def _submit(self, request: Request) -> Any:
        principal = await authorize(request, "jobs:write")
        key = request.headers.get("idempotency-key")
        if key is not None:
            try:
                _KEY.validate_python(key)
            except ValidationError as exc:
                raise RequestValidationError(
                    [
                        {**e, "loc": ["header", "idempotency-key"]}
                        for e in exc.errors(include_url=False)
                    ]
                ) from None
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            at = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ["body", at],
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": str(exc)},
                    }
                ]
            ) from None
        try:
            body = JobCreate.model_validate(data, from_attributes=True)  # as FastAPI does
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False)]
            ) from None
        return await submit(body, principal, key)

    async def _read(self, request: Request) -> Any:
        principal = await authorize(request, "jobs:read")
        raw = request.query_params.get("wait")
        wait = 0.0
        if raw is not None:
            try:
                wait = _WAIT.validate_python(raw)
            except ValidationError as exc:
                raise RequestValidationError(
                    [{**e, "loc": ["query", "wait"]} for e in exc.errors(include_url=False)]
                ) from None
        return await read_job(request.scope["path"][len(_PREFIX) :], principal, wait)
