"""Group commit: jobs submitted together share one INSERT, one commit and one broker message.

Requests hand their job rows to one writer thread per API process. The writer takes
whatever has arrived, never waiting for more, inserts it in one statement, commits, then
puts the jobs on the broker, a few messages per batch; only then are the requests
answered 202. Under load many requests ride each commit; alone, a request pays one
commit and one publish, as it would without the writer. If the commit fails nothing was
accepted (503); if the publish fails the batch is withdrawn (deleted) before the 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
from psycopg2.extras import execute_values

from api.deps import redis_sync
from shared.config import get_settings
from shared.db import get_engine
from workers.dispatch import enqueue, ring_predict

__all__ = [
    "NewJob",
    "GroupCommitter",
    "submitter",
    "DatabaseUnavailableError",
    "BrokerUnavailableError",
    "IdempotencyKeyTakenError",
]

log = logging.getLogger(__name__)

#: Jobs per commit at most; a bigger backlog simply takes several commits.
MAX_BATCH = 1000


class DatabaseUnavailableError(RuntimeError):
    """The jobs could not be recorded: nothing was accepted."""


class BrokerUnavailableError(RuntimeError):
    """The jobs could not be put on the broker; they were withdrawn."""


class IdempotencyKeyTakenError(RuntimeError):
    """Another request recorded a job with this Idempotency-Key first."""


@dataclass
class NewJob:
    id: uuid.UUID
    tenant: str
    type: str
    model: str
    model_version: int | None
    priority: str
    request: dict[str, Any]
    metadata: dict[str, Any] | None
    request_hash: str | None
    created_at: datetime
    idempotency_key: str | None = None


# A job whose Idempotency-Key another request recorded first is skipped, not the batch.
_INSERT = (
    "INSERT INTO jobs (id, tenant, type, model, model_version, status, priority, request, "
    "metadata, idempotency_key, request_hash, attempts, created_at) VALUES %s "
    "ON CONFLICT DO NOTHING RETURNING id"
)
_TEMPLATE = "(%s::uuid, %s, %s, %s, %s, 'queued', %s, %s::jsonb, %s::jsonb, %s, %s, 0, %s)"


class GroupCommitter:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[NewJob, Future[None]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._lock = threading.Lock()

    async def submit(self, job: NewJob) -> None:
        """Resolves once the job is committed and on the broker; raises the 503 errors."""
        self._ensure_thread()
        done: Future[None] = Future()
        self._queue.put((job, done))
        await asyncio.wrap_future(done)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="inferq-group-commit", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                recorded = self._commit([job for job, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
                continue
            for job, done in batch:
                if job.id in recorded:
                    done.set_result(None)
                else:
                    done.set_exception(IdempotencyKeyTakenError(job.idempotency_key))

    def _connection(self) -> Any:
        """The writer's own pooled connection, kept between batches."""
        if self._conn is None:
            self._conn = get_engine().raw_connection()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
        self._conn = None

    def _commit(self, jobs: list[NewJob]) -> set[uuid.UUID]:
        """Insert and publish; returns the ids recorded (all but idempotency losers)."""
        rows = [
            (
                str(j.id),
                j.tenant,
                j.type,
                j.model,
                j.model_version,
                j.priority,
                json.dumps(j.request),
                json.dumps(j.metadata) if j.metadata is not None else None,
                j.idempotency_key,
                j.request_hash,
                j.created_at,
            )
            for j in jobs
        ]
        try:
            conn = self._connection()
            with conn.cursor() as cur:
                returned = execute_values(
                    cur, _INSERT, rows, template=_TEMPLATE, page_size=MAX_BATCH, fetch=True
                )
            conn.commit()
        except psycopg2.Error as exc:
            self._drop_connection()
            log.error("could not record %d jobs: %s", len(jobs), exc)
            raise DatabaseUnavailableError(str(exc)) from exc
        recorded = {uuid.UUID(str(r[0])) for r in returned}
        accepted = [j for j in jobs if j.id in recorded]
        try:
            predict = [(j.id, j.type, j.priority) for j in accepted if j.type == "predict"]
            ring_predict(redis_sync(), predict)
            enqueue([(j.id, j.type, j.priority) for j in accepted if j.type != "predict"])
        except Exception as exc:
            log.error("broker unavailable, withdrawing %d jobs: %s", len(accepted), exc)
            self._withdraw(accepted)
            raise BrokerUnavailableError(str(exc)) from exc
        self._mirror_queued(accepted)
        return recorded

    def _mirror_queued(self, jobs: list[NewJob]) -> None:
        """Hot copies of the new jobs, so long-polls on them need no Postgres read. SET NX:
        a worker that already wrote the terminal copy is never overwritten."""
        try:
            redis = redis_sync()
            ttl = get_settings().result_ttl_s
            pipe = redis.pipeline(transaction=False)
            for j in jobs:
                view = {
                    "id": str(j.id),
                    "type": j.type,
                    "status": "queued",
                    "model": j.model,
                    "model_version": j.model_version,
                    "progress": None,
                    "result": None,
                    "error": None,
                    "metadata": j.metadata,
                    "attempts": 0,
                    "created_at": j.created_at.isoformat(),
                    "started_at": None,
                    "finished_at": None,
                }
                doc = json.dumps({"tenant": j.tenant, "view": view})
                pipe.set(get_settings().key("job", j.id), doc, ex=ttl, nx=True)
            pipe.execute()
        except Exception:  # only an optimisation: reads fall back to Postgres
            log.warning("could not write hot copies of new jobs", exc_info=True)

    def _withdraw(self, jobs: list[NewJob]) -> None:
        try:
            conn = self._connection()
            with conn.cursor() as cur:
                cur.execute(
                    "DELETE FROM jobs WHERE id = ANY(%s::uuid[]) AND status = 'queued'",
                    ([str(j.id) for j in jobs],),
                )
            conn.commit()
        except psycopg2.Error:
            self._drop_connection()
            log.exception("could not withdraw jobs; the sweeper will send them")


submitter = GroupCommitter()
