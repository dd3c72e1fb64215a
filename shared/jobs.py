"""The job store: Postgres is the ledger, Redis holds a hot copy of each job's public view.

Status changes only through the compare-and-set functions here, so a second delivery of a
task, a cancel racing a finish, or a sweeper re-send can never move a job backwards.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis import Redis
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.metrics import record_ended
from shared.orm import Job

__all__ = [
    "JobStatus",
    "TERMINAL",
    "DONE_CHANNEL",
    "public_view",
    "mirror",
    "claim",
    "finish",
    "fail",
    "cancel",
    "heartbeat",
    "ended_hooks",
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
#: delivery registers here, see ``workers.dispatch``).
ended_hooks: list[Callable[[list[Job]], None]] = []


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def public_view(job: Job) -> dict[str, Any]:
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


def mirror(redis: Redis, jobs: list[Job], *, pipe: Any = None) -> None:
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


_CLAIM = text(
    """
    WITH picked AS (
        SELECT id FROM jobs
        WHERE (id = ANY(CAST(:ids AS uuid[]))
               AND (status = 'queued' OR (status = 'running' AND heartbeat_at < :cutoff)))
           OR (status = 'running' AND worker LIKE :redelivered)
        FOR UPDATE SKIP LOCKED
    ), extra AS (
        SELECT id FROM jobs
        WHERE status = 'queued' AND type = 'predict' AND id <> ALL(CAST(:ids AS uuid[]))
        ORDER BY created_at
        LIMIT :drain
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = :worker,
                    started_at = now(), heartbeat_at = now()
    WHERE id IN (SELECT id FROM picked UNION SELECT id FROM extra)
    RETURNING *
    """
)


def claim(
    session: Session,
    job_ids: list[uuid.UUID],
    *,
    worker: str,
    task_id: str,
    drain: int = 0,
) -> list[Job]:
    """Move jobs to ``running`` for this delivery; returns the jobs this delivery may run.

    A job is taken when it is queued; when it is running under this same task id (the
    message was redelivered because its worker died); or when it is running but its lease
    ran out (no heartbeat for ``INFERQ_RUNNING_LEASE_S``). ``drain`` > 0 also takes up to
    that many other queued predict jobs, oldest first: whatever is waiting is predicted in
    this batch. Rows another delivery holds are skipped, so duplicates take nothing. Each
    take counts an attempt; past ``INFERQ_MAX_ATTEMPTS`` the job fails for good instead.
    """
    settings = get_settings()
    cutoff = datetime.fromtimestamp(_now().timestamp() - settings.running_lease_s, UTC)
    taken = list(
        session.scalars(
            select(Job).from_statement(_CLAIM),
            {
                "ids": [str(i) for i in job_ids],
                "cutoff": cutoff,
                "redelivered": f"%/{task_id}",
                "drain": drain,
                "worker": f"{worker}/{task_id}",
            },
        )
    )
    exhausted = [j.id for j in taken if j.attempts > settings.max_attempts]
    if not exhausted:
        return taken
    failed = {
        j.id: j
        for j in session.scalars(
            update(Job)
            .where(Job.id.in_(exhausted))
            .values(
                status=JobStatus.FAILED,
                finished_at=_now(),
                error={
                    "code": "too_many_attempts",
                    "message": f"gave up after {settings.max_attempts} attempts "
                    "(the worker running it died or timed out each time)",
                },
            )
            .returning(Job)
            .execution_options(populate_existing=True)
        )
    }
    for job_id in failed:
        log.warning("job %s failed: too many attempts", job_id, extra={"job_id": str(job_id)})
    return [failed.get(j.id, j) for j in taken]


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
