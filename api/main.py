"""Assembles the FastAPI app: routers, middleware, error handlers, start-up."""

from __future__ import annotations

import gc
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import REGISTRY, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import redis_async, redis_sync
from api.fastpath import BodyTooLargeError, FastPath
from api.routes import jobs, models, monitoring, ops
from api.submitter import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    JobRejectedError,
    OutcomeUnknownError,
)
from api.waiter import waiter
from shared import keys
from shared.batching.pending import pending_keys
from shared.broker import PRIORITIES, QUEUES
from shared.config import get_settings
from shared.db import session_scope
from shared.logs import configure_logging
from shared.metrics import StatsCollector

log = logging.getLogger("inferq.api")

REQUEST_SECONDS = Histogram(
    "inferq_http_request_duration_seconds",
    "API request latency.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
_collector_registered = False


#: Artifact uploads: the one route whose bodies may be larger (INFERQ_MAX_ARTIFACT_BYTES).
_UPLOAD = re.compile(r"^/v1/models/[^/]+/versions/?$")


class BodyLimitMiddleware:
    """413 for bodies over INFERQ_MAX_BODY_BYTES (INFERQ_MAX_ARTIFACT_BYTES for an artifact
    upload), refused before they are read past the limit."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app = app
        self.body_limit = limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and _UPLOAD.match(scope["path"]) is not None
        limit = self.upload_limit if upload else self.body_limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    return await self._refuse(send, limit, upload)
                break
        seen = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answer now; whatever the app makes of the aborted read is dropped below.
                    if not started and not refused:
                        refused = True
                        await self._refuse(send, limit, upload)
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with suppress(BodyTooLargeError):
            await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send, limit: int, upload: bool) -> None:
        setting = "INFERQ_MAX_ARTIFACT_BYTES" if upload else "INFERQ_MAX_BODY_BYTES"
        response = JSONResponse(
            {"detail": f"request body over {limit} bytes ({setting})"}, status_code=413
        )
        await response({"type": "http"}, _no_receive, send)


class JsonOnlyMiddleware:
    """415 for a submit whose Content-Type is not JSON (a missing one is taken as JSON), on
    the fast path and FastAPI's alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/jobs":
            for name, value in scope["headers"]:
                if name == b"content-type":
                    media = value.split(b";", 1)[0].strip().lower()
                    if media != b"application/json" and not media.endswith(b"+json"):
                        response = JSONResponse(
                            {"detail": "Content-Type must be application/json"}, status_code=415
                        )
                        return await response(scope, receive, send)
                    break
        await self.app(scope, receive, send)


class ObserveMiddleware:
    """Request latency by route template and status (plain ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        code = 500

        async def send_status(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            REQUEST_SECONDS.labels(
                scope["method"], getattr(route, "path", "unmatched"), code
            ).observe(time.perf_counter() - start)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {k: v for k, v in e.items() if k in ("type", "loc", "msg", "input")} for e in exc.errors()
    ]
    return JSONResponse({"detail": _finite(jsonable_encoder(errors))}, status_code=422)


def _unavailable(what: str):  # type: ignore[no-untyped-def]
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s unavailable on %s %s: %s", what, request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": f"{what} unavailable; nothing was accepted, retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    return handler


async def _outcome_unknown(request: Request, exc: OutcomeUnknownError) -> JSONResponse:
    log.error("%s", exc, extra={"job_id": str(exc.job_id)})
    retry = (
        "retry with the same Idempotency-Key"
        if exc.idempotency_key
        else "retry only after looking it up (or send an Idempotency-Key next time)"
    )
    return JSONResponse(
        {
            "detail": (
                "database unavailable while recording the job: it may have been recorded, "
                f"and then it runs; look it up with GET /v1/jobs/{exc.job_id}, or {retry}"
            ),
            "job_id": str(exc.job_id),
            "outcome": "unknown",
        },
        status_code=503,
        headers={"Retry-After": "5"},
    )


async def _rejected(request: Request, exc: JobRejectedError) -> JSONResponse:
    detail = [{"type": "value_error", "loc": ["body"], "msg": str(exc), "input": None}]
    return JSONResponse({"detail": detail}, status_code=422)


async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
    # Only the JSON parser recurses on a client's input (everything after it checks depth).
    return JSONResponse({"detail": "request body is nested too deeply"}, status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _bootstrap() -> None:
    value = get_settings().bootstrap_api_key
    if value:
        with session_scope() as session:
            keys.ensure_key(session, value)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global _collector_registered
    try:
        _bootstrap()
    except DBAPIError as exc:
        log.error("could not ensure the bootstrap API key (database unavailable): %s", exc)
    if not _collector_registered:
        REGISTRY.register(
            StatsCollector(
                redis_sync(), QUEUES, sorted(set(PRIORITIES.values())), pending=pending_keys()
            )
        )
        _collector_registered = True
    waiter.start(redis_async())
    # Everything imported and built so far lives as long as the process: out of the
    # cyclic collector's way (a full collection walked it all, 130-150 ms under load
    # here, every request waiting behind it).
    gc.collect()
    gc.freeze()
    yield
    await waiter.stop()


def create_api() -> FastAPI:
    """The FastAPI application: every route, its OpenAPI description, the error handlers."""
    # /docs and /redoc from Swagger UI's and ReDoc's files installed with fastapi-offline,
    # so they work on a machine without internet (FastAPI's own pages load them from a CDN).
    app = FastAPIOffline(
        title="inferq",
        version="1",
        summary="Asynchronous inference for scikit-learn models.",
        lifespan=lifespan,
    )
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(monitoring.router)
    app.include_router(ops.router)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    down: dict[str, tuple[type[Exception], ...]] = {
        "database": (OperationalError, InterfaceError, SATimeoutError, DatabaseUnavailableError),
        "broker": (BrokerError, BrokerUnavailableError, RedisConnectionError, RedisTimeoutError),
    }
    for what, errors in down.items():
        for exc in errors:
            app.add_exception_handler(exc, _unavailable(what))
    app.add_exception_handler(RecursionError, _too_deep)  # type: ignore[arg-type]
    app.add_exception_handler(JobRejectedError, _rejected)  # type: ignore[arg-type]
    app.add_exception_handler(OutcomeUnknownError, _outcome_unknown)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    return app


def create_app() -> ASGIApp:
    """What uvicorn serves: the body limit and request metrics around everything, then the
    fast path, then FastAPI. They wrap the FastAPI application from outside, so the two hot
    routes skip its middleware stack too, not only its routing."""
    settings = get_settings()
    api = create_api()
    inner: ASGIApp = FastPath(api, api=api) if settings.fast_path else api
    return BodyLimitMiddleware(
        ObserveMiddleware(JsonOnlyMiddleware(inner)),
        limit=settings.max_body_bytes,
        upload_limit=settings.max_artifact_bytes,
    )


configure_logging(level=get_settings().log_level, json_lines=get_settings().log_json, process="api")
app = create_app()
