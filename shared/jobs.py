"""The job store: Postgres is the ledger, Redis holds a hot copy of each job's public view.

Status changes only through the compare-and-set functions here, so a second delivery of a
task, a cancel racing a finish, or a sweeper re-send can never move a job backwards.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis import Redis
from sqlalchemy import Connection, select, text, update
from sqlalchemy.orm import Session

from shared import prepared
from shared.config import get_settings
from shared.metrics import record_ended
from shared.orm import Job
from shared.prepared import Statement

__all__ = [
    "JobStatus",
    "TERMINAL",
    "DONE_CHANNEL",
    "public_view",
    "mirror",
    "JobRow",
    "claim",
    "claim_batch",
    "settle_batch",
    "finish",
    "fail",
    "cancel",
    "heartbeat",
    "ended_hooks",
    "withdrawn_key",
    "WITHDRAWN_TTL_S",
]

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    """queued → running → succeeded | failed | cancelled. Terminal states never change."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: Redis pub/sub channel: a job id is published when the job reaches a terminal state,
#: followed by a space and its hot copy when that is at most DONE_PAYLOAD_MAX bytes.
DONE_CHANNEL = "done"
DONE_PAYLOAD_MAX = 16 * 1024
#: Called with the jobs that just ended, after their hot copies are written (callback
#: delivery registers here, see ``shared.dispatch``).
ended_hooks: list[Callable[[Sequence[Job | JobRow]], None]] = []


@dataclass(slots=True)
class JobRow:
    """A job as a predict batch handles it: the columns it needs, read without the ORM.

    It has the attributes of ``shared.orm.Job`` that ``public_view``, ``mirror`` and the
    ended-job hooks read, so either can be passed to them.
    """

    id: uuid.UUID
    tenant: str
    type: str
    model: str
    model_version: int | None
    status: str
    request: dict[str, Any]
    meta: dict[str, Any] | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None


#: How long a withdrawal mark lasts: longer than Postgres is expected to stay away.
WITHDRAWN_TTL_S = 7 * 24 * 3600


def withdrawn_key(job_id: uuid.UUID | str) -> str:
    """The Redis key marking a job the API withdrew while Postgres could not be reached
    (the INSERT's answer was lost, the client told 503): if the job turns out recorded,
    the sweeper deletes it instead of sending it."""
    return get_settings().key("withdrawn", str(job_id))


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def public_view(job: Job | JobRow) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (without ``links``, added by the API)."""
    return {
        "id": str(job.id),
        "type": job.type,
        "status": job.status,
        "model": job.model,
        "model_version": job.model_version,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
        "metadata": job.meta,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def mirror(redis: Redis, jobs: Sequence[Job | JobRow], *, pipe: Any = None) -> None:
    """Write the hot copy of each job to Redis (TTL ``INFERQ_RESULT_TTL_S``).

    Terminal jobs are also announced on the done channel, which wakes long-polls.
    """
    settings = get_settings()
    p = pipe if pipe is not None else redis.pipeline(transaction=False)
    record_ended(p, [j for j in jobs if j.status in TERMINAL])
    for job in jobs:
        doc = json.dumps({"tenant": job.tenant, "view": public_view(job)})
        p.set(settings.key("job", job.id), doc, ex=settings.result_ttl_s)
        if job.status in TERMINAL:
            # Small copies ride along, so a waiting long-poll needs no second read.
            note = f"{job.id} {doc}" if len(doc) <= DONE_PAYLOAD_MAX else str(job.id)
            p.publish(settings.key(DONE_CHANNEL), note)
    if pipe is None:
        p.execute()
    ended = [j for j in jobs if j.status in TERMINAL]
    if ended:
        for hook in ended_hooks:
            try:
                hook(ended)
            except Exception:  # a notification must never undo a recorded result
                log.exception("ended-job hook failed")


def _now() -> datetime:
    return datetime.now(UTC)


# Jobs are found by primary key only: scanning ix_jobs_unfinished for queued jobs walked
# the dead entries of every recently finished job (a bitmap scan cannot skip them; 1.6 ms
# a claim with 23,000 of them, growing until autovacuum). ``retaken`` does walk the
# unfinished jobs, so it runs only for a redelivered message: with $4 false the plan
# skips it.
CLAIM = Statement(
    "inferq_claim",
    ("uuid[]", "timestamptz", "text", "boolean", "text"),
    """WITH picked AS (
        SELECT id FROM jobs
        WHERE id = ANY($1)
          AND (status = 'queued'
               OR (status = 'running' AND (heartbeat_at < $2 OR worker LIKE $3)))
        FOR UPDATE SKIP LOCKED
    ), retaken AS (
        SELECT id FROM jobs
        WHERE $4 AND finished_at IS NULL AND status = 'running' AND worker LIKE $3
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = $5,
                    started_at = now(), heartbeat_at = now()
    WHERE id IN (SELECT id FROM picked UNION SELECT id FROM retaken)
    RETURNING id, tenant, type, model, model_version, status, request, metadata, attempts,
              created_at, started_at""",  # JobRow's first fields, in order
    prepare=False,
)
SETTLE = Statement(
    "inferq_settle",
    ("uuid[]", "text[]", "jsonb[]", "jsonb[]", "jsonb[]"),
    """UPDATE jobs AS j SET status = v.status, result = v.result, error = v.error,
           progress = COALESCE(v.progress, j.progress), finished_at = now()
    FROM unnest($1, $2, $3, $4, $5) AS v(id, status, result, error, progress)
    WHERE j.id = v.id AND j.status = 'running'
    RETURNING j.id, j.finished_at""",
    prepare=False,
)

#: Sent first in every transaction that ends a job. Worker processes commit without
#: waiting for the WAL flush (``shared.db.relax_commits``), but the end of a job is about
#: to be shown to clients (hot copy, long-polls, callbacks): a Postgres crash must not
#: take back a result somebody has read, so this commit waits for the flush.
_DURABLE_SQL = "SET LOCAL synchronous_commit TO on"
DURABLE = Statement("inferq_durable", (), _DURABLE_SQL, prepare=False)


def durable(session: Session) -> None:
    """This session's transaction commits durably (see ``DURABLE``)."""
    session.execute(text(_DURABLE_SQL))


#: What ``settle_batch`` writes for a job: (status, result, error).
End = tuple[str, dict[str, Any] | None, dict[str, Any] | None]


def claim_batch(
    conn: Connection,
    job_ids: list[uuid.UUID],
    *,
    worker: str,
    task_id: str,
    redelivered: bool = False,
) -> list[JobRow]:
    """Move jobs to ``running`` for this delivery; returns the jobs this delivery may run.

    A job is taken when it is queued; when it is running under this same task id (the
    message was redelivered because its worker died, or retried); or when it is running
    but its lease ran out (no heartbeat for ``INFERQ_RUNNING_LEASE_S``). A
    ``redelivered`` message also retakes every job its task id was running, the ones its
    first run popped from the pending lists included. Rows another delivery holds are
    skipped, so duplicates take nothing. Each take counts an attempt; past
    ``INFERQ_MAX_ATTEMPTS`` the job fails for good instead.

    One statement: on an autocommit connection the claim is one round trip.
    """
    settings = get_settings()
    cutoff = datetime.fromtimestamp(_now().timestamp() - settings.running_lease_s, UTC)
    args = ([str(i) for i in job_ids], cutoff, f"%/{task_id}", redelivered, f"{worker}/{task_id}")
    rows = prepared.run(conn, (CLAIM, args))
    taken = [JobRow(_uuid(r[0]), *r[1:]) for r in rows]  # RETURNING lists JobRow's fields
    exhausted = [j for j in taken if j.attempts > settings.max_attempts]
    if exhausted:
        error = {
            "code": "too_many_attempts",
            "message": f"gave up after {settings.max_attempts} attempts "
            "(the worker running it died or timed out each time)",
        }
        ends: dict[uuid.UUID, End] = {j.id: ("failed", None, error) for j in exhausted}
        for job in settle_batch(conn, exhausted, ends):
            log.warning("job %s failed: too many attempts", job.id, extra={"job_id": str(job.id)})
    return taken


def claim(
    session: Session,
    job_ids: list[uuid.UUID],
    *,
    worker: str,
    task_id: str,
) -> list[Job]:
    """``claim_batch`` inside the session's transaction, returning ORM jobs (score, train)."""
    taken = claim_batch(session.connection(), job_ids, worker=worker, task_id=task_id)
    if not taken:
        return []
    jobs = session.scalars(
        select(Job)
        .where(Job.id.in_([j.id for j in taken]))
        .execution_options(populate_existing=True)
    )
    return list(jobs)


def settle_batch(
    conn: Connection,
    jobs: Iterable[JobRow],
    ends: dict[uuid.UUID, End],
    *,
    progress: dict[uuid.UUID, dict[str, int]] | None = None,
    before: tuple[Statement, Sequence[Any]] | None = None,
) -> list[JobRow]:
    """running → succeeded | failed for many jobs in one statement, with their (status,
    result, error) from ``ends``. ``before`` is a statement sent with it and run in the
    same transaction first (the batch's prediction logs), so both commit or neither does.
    Jobs cancelled meanwhile stay cancelled and are left out of the returned rows."""
    wanted = [j for j in jobs if j.id in ends]
    if not wanted:
        return []
    args = (
        [str(j.id) for j in wanted],
        [ends[j.id][0] for j in wanted],
        [_json(ends[j.id][1]) for j in wanted],
        [_json(ends[j.id][2]) for j in wanted],
        [_json((progress or {}).get(j.id)) for j in wanted],
    )
    statements = [(DURABLE, ()), *([before] if before is not None else [])]
    returned = prepared.run(conn, *statements, (SETTLE, args))
    finished = {_uuid(job_id): at for job_id, at in returned}
    out = []
    for job in wanted:
        if job.id in finished:
            job.status, job.result, job.error = ends[job.id]
            job.finished_at = finished[job.id]
            job.progress = (progress or {}).get(job.id, job.progress)
            out.append(job)
    return out


def _json(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def finish(
    session: Session,
    results: dict[uuid.UUID, dict[str, Any]],
    *,
    progress: dict[uuid.UUID, dict[str, int]] | None = None,
) -> list[Job]:
    """running → succeeded with each job's result, all in one statement; jobs cancelled
    meanwhile stay cancelled (and are not returned)."""
    if not results:
        return []
    durable(session)
    rows, params = [], {}
    for i, (job_id, result) in enumerate(results.items()):
        rows.append(f"(CAST(:id{i} AS uuid), CAST(:r{i} AS jsonb), CAST(:p{i} AS jsonb))")
        params[f"id{i}"] = str(job_id)
        params[f"r{i}"] = json.dumps(result)
        params[f"p{i}"] = json.dumps((progress or {}).get(job_id))
    stmt = text(
        "UPDATE jobs AS j SET status = 'succeeded', result = v.result, finished_at = now(), "
        "progress = COALESCE(NULLIF(v.progress, 'null'::jsonb), j.progress) "
        f"FROM (VALUES {', '.join(rows)}) AS v(id, result, progress) "
        "WHERE j.id = v.id AND j.status = 'running' RETURNING j.*"
    )
    return list(session.scalars(select(Job).from_statement(stmt), params))


def fail(session: Session, job_id: uuid.UUID, *, code: str, message: str) -> Job | None:
    """queued | running → failed with a client-readable error (never a traceback)."""
    durable(session)
    return session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(
            status=JobStatus.FAILED, finished_at=_now(), error={"code": code, "message": message}
        )
        .returning(Job)
    )


def cancel(session: Session, job_id: uuid.UUID, *, tenant: str) -> tuple[Job | None, bool]:
    """(job, changed): queued | running → cancelled. An ended job is returned unchanged."""
    job = session.scalar(
        update(Job)
        .where(
            Job.id == job_id,
            Job.tenant == tenant,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .values(status=JobStatus.CANCELLED, finished_at=_now())
        .returning(Job)
    )
    if job is not None:
        return job, True
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant)), False


def heartbeat(session: Session, job_id: uuid.UUID) -> None:
    """Renew a running job's lease, so the sweeper leaves it to the delivery running it."""
    session.execute(
        text("UPDATE jobs SET heartbeat_at = now() WHERE id = :id AND status = 'running'"),
        {"id": job_id},
    )
