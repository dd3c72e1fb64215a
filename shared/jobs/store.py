"""The job store: Postgres is the ledger, Redis holds a hot copy of each job's public view.

Every change of a job's status happens here (claim, settle, fail, cancel), each a
compare-and-set in one statement, so a second delivery of a task, a cancel racing a
finish, or a sweeper re-send can never move a job backwards; ``mirror`` then writes the
hot copies and announces the ended jobs. A job's fields and view are defined in
``shared.jobs.fields``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from shared import sql
from shared.broker import send_callbacks
from shared.config import get_settings
from shared.jobs.fields import (
    CLAIMED,
    DONE_CHANNEL,
    TERMINAL,
    JobRow,
    JobStatus,
    column_list,
    done_messages,
    from_claimed,
    hot_copy,
)
from shared.metrics import record_ended
from shared.orm import Job
from shared.sql import Statement

__all__ = [
    "mirror",
    "claim",
    "claim_batch",
    "settle_batch",
    "finish",
    "fail",
    "cancel",
    "heartbeat",
    "withdrawn_key",
    "WITHDRAWN_TTL_S",
]

log = logging.getLogger(__name__)


#: How long a withdrawal mark lasts: longer than Postgres is expected to stay away.
WITHDRAWN_TTL_S = 7 * 24 * 3600


def withdrawn_key(job_id: uuid.UUID | str) -> str:
    """The Redis key marking a job the API withdrew while Postgres could not be reached
    (the INSERT's answer was lost, the client told 503): if the job turns out recorded,
    the sweeper deletes it instead of sending it."""
    return get_settings().key("withdrawn", str(job_id))


def mirror(redis: Redis, jobs: Sequence[Job | JobRow], *, pipe: Any = None) -> None:
    """Write the hot copy of each job to Redis (TTL ``INFERQ_RESULT_TTL_S``).

    Terminal jobs are also announced on the done channel, which wakes long-polls, and
    those that asked for a callback get their delivery sent (``shared.jobs.callbacks``).
    """
    settings = get_settings()
    p = pipe if pipe is not None else redis.pipeline(transaction=False)
    ended = [j for j in jobs if j.status in TERMINAL]
    record_ended(p, ended)
    done: list[tuple[uuid.UUID, str]] = []
    for job in jobs:
        doc = hot_copy(job)
        p.set(settings.key("job", job.id), doc, ex=settings.result_ttl_s)
        if job.status in TERMINAL:
            done.append((job.id, doc))
    for message in done_messages(done):
        p.publish(settings.key(DONE_CHANNEL), message)
    if pipe is None:
        p.execute()
    if ended:
        try:
            send_callbacks(ended)
        except Exception:  # a notification must never undo a recorded result (the
            # outbox keeps the delivery owed; the sweeper sends it)
            log.exception("could not send callback deliveries")


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
    RETURNING """
    + column_list(CLAIMED),
    prepare=False,
)
SETTLE = Statement(
    "inferq_settle",
    ("uuid[]", "text[]", "jsonb[]", "jsonb[]", "jsonb[]"),
    """UPDATE jobs AS j SET status = v.status, result = v.result, error = v.error,
           progress = COALESCE(v.progress, j.progress), finished_at = statement_timestamp()
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
    sql.run(session.connection(), (DURABLE, ()))


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
    rows = sql.run(conn, (CLAIM, args))
    taken = [from_claimed(r) for r in rows]
    exhausted = [j for j in taken if j.attempts > settings.max_attempts]
    if exhausted:
        error = {
            "code": "too_many_attempts",
            "message": f"gave up after {settings.max_attempts} attempts "
            "(the worker running it died or timed out each time)",
        }
        ends: dict[uuid.UUID, End] = {j.id: (JobStatus.FAILED, None, error) for j in exhausted}
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


def settle(
    conn: Connection,
    ends: dict[uuid.UUID, End],
    *,
    progress: dict[uuid.UUID, dict[str, int]] | None = None,
    before: tuple[Statement, Sequence[Any]] | None = None,
) -> dict[uuid.UUID, datetime]:
    """running → succeeded | failed for many jobs in one durable statement, each with its
    (status, result, error) from ``ends``, the one way a running job ends. ``before`` is a
    statement sent with it and run in the same transaction first (a batch's prediction
    logs), so both commit or neither does. Returns the ended jobs' ``finished_at``; jobs
    cancelled meanwhile stay cancelled and are left out."""
    if not ends:
        return {}
    ids = list(ends)
    args = (
        [str(i) for i in ids],
        [ends[i][0] for i in ids],
        [_json(ends[i][1]) for i in ids],
        [_json(ends[i][2]) for i in ids],
        [_json((progress or {}).get(i)) for i in ids],
    )
    statements = [(DURABLE, ()), *([before] if before is not None else [])]
    returned = sql.run(conn, *statements, (SETTLE, args))
    return {_uuid(job_id): at for job_id, at in returned}


def settle_batch(
    conn: Connection,
    jobs: Iterable[JobRow],
    ends: dict[uuid.UUID, End],
    *,
    progress: dict[uuid.UUID, dict[str, int]] | None = None,
    before: tuple[Statement, Sequence[Any]] | None = None,
) -> list[JobRow]:
    """``settle`` for a predict batch's ``JobRow`` objects, updated in place; returns the
    ones that ended."""
    wanted = [j for j in jobs if j.id in ends]
    if not wanted:
        return []
    finished = settle(conn, {j.id: ends[j.id] for j in wanted}, progress=progress, before=before)
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
    """``settle`` to succeeded with each job's result, inside the session's transaction
    (score runs, train jobs); returns the ended jobs as ORM objects."""
    ends: dict[uuid.UUID, End] = {i: (JobStatus.SUCCEEDED, r, None) for i, r in results.items()}
    finished = settle(session.connection(), ends, progress=progress)
    if not finished:
        return []
    jobs = session.scalars(
        select(Job).where(Job.id.in_(list(finished))).execution_options(populate_existing=True)
    )
    return list(jobs)


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
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=func.now())
    )
