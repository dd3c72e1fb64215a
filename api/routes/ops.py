"""Operations: liveness, readiness per dependency, Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select

from api.deps import redis_sync
from shared.broker import celery_app
from shared.config import get_settings
from shared.db import get_engine

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


def _check(name: str, fn: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as exc:
        # The answer is public: it names what failed, never an address or a password
        # (drivers put both in their messages); the log has the whole error.
        log.warning("readiness: %s failed: %s", name, exc)
        detail, ok = _UNAVAILABLE.get(name, "unavailable") + f" ({type(exc).__name__})", False
    out = {"ok": ok, "ms": round((time.perf_counter() - start) * 1000, 1)}
    if detail is not None:
        out["detail"] = detail
    return out


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(select(1))


def _redis() -> None:
    redis_sync().ping()


def _broker() -> None:
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


class NoWorkersError(RuntimeError):
    """No worker process has renewed its heartbeat lately."""


def _workers() -> str:
    """Worker processes refresh a heartbeat key every few seconds, whose value says whether
    they have loaded the production versions yet (see workers.process)."""
    redis = redis_sync()
    names = list(redis.scan_iter(get_settings().key("worker", "*"), count=1000))
    if not names:
        raise NoWorkersError("no worker process has renewed its heartbeat lately")
    ready = sum(1 for v in redis.mget(names) if v == b"ready")
    if not ready:
        raise NoWorkersError(f"{len(names)} worker processes, none has loaded its models yet")
    return f"{len(names)} worker processes, {ready} with their models loaded"


_UNAVAILABLE = {
    "database": "cannot query the database",
    "redis": "cannot reach Redis",
    "broker": "cannot reach the broker",
    "workers": "no worker process is alive with its models loaded",
}


def _readiness() -> dict[str, Any]:
    checks = {"database": _database, "redis": _redis, "broker": _broker, "workers": _workers}
    return {name: _check(name, fn) for name, fn in checks.items()}


@router.get("/readyz")
async def readyz(response: Response) -> dict[str, Any]:
    """Ready when the database, Redis, the broker and at least one worker answer; else 503."""
    checks = await run_in_threadpool(_readiness)
    ready = all(c["ok"] for c in checks.values())
    if not ready:
        response.status_code = 503
    return {"status": "ready" if ready else "unavailable", "checks": checks}


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
