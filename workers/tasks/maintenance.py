"""Beat's housekeeping: the stuck-job sweeper, due callbacks, nightly runs, MLflow sync.

Retention is ``workers.tasks.retention``'s."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.broker import enqueue
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs.fields import JobStatus, JobType, Priority
from shared.jobs.store import durable, withdrawn_key
from shared.models.registry import list_versions, production_versions
from shared.orm import Job, ScoringChunk, ScoringRun
from workers.app import celery_app
from workers.process import heartbeat_key, redis_client

log = logging.getLogger(__name__)

#: Jobs re-sent per sweep; the next sweep takes the rest.
SWEEP_LIMIT = 5000


def sweep_once() -> int:
    """Re-send queued jobs older than INFERQ_REQUEUE_AFTER_S and running jobs whose lease ran out.

    Re-sending is always safe: a task claims a job by compare-and-set, so a duplicate
    message for a job that another delivery holds does nothing.
    """
    s = get_settings()
    now = datetime.now(UTC)
    queued_cutoff = now - timedelta(seconds=s.requeue_after_s)
    lease_cutoff = now - timedelta(seconds=s.running_lease_s)
    with session_scope() as session:
        found = session.execute(
            select(Job.id, Job.type, Job.priority, Job.status)
            .where(
                Job.finished_at.is_(None),  # the condition of ix_jobs_unfinished
                or_(
                    and_(
                        Job.status == JobStatus.QUEUED,
                        or_(Job.enqueued_at.is_(None), Job.enqueued_at < queued_cutoff),
                        Job.created_at < queued_cutoff,
                    ),
                    and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < lease_cutoff),
                ),
            )
            .order_by(Job.created_at)
            .limit(SWEEP_LIMIT)
            .with_for_update(skip_locked=True)
        ).all()
        rows = _drop_withdrawn(session, found) if found else []
        if not rows:
            return 0
        session.execute(update(Job).where(Job.id.in_([r.id for r in rows])).values(enqueued_at=now))
    # Sent only after the commit: a worker claiming while this transaction still held the
    # rows would skip them (SKIP LOCKED), and they would wait for the next requeue.
    enqueue([(r.id, r.type, r.priority) for r in rows])
    log.warning("sweeper re-sent %d stuck jobs", len(rows))
    return len(rows)


def _drop_withdrawn(session: Session, rows: Sequence[Any]) -> list[Any]:
    """Delete the queued jobs the API marked withdrawn (their INSERT's answer was lost and
    the client was told 503; see ``api.submitter``); returns the other rows."""
    queued = [r.id for r in rows if r.status == JobStatus.QUEUED]
    if not queued:
        return list(rows)
    redis = redis_client()
    marks = redis.mget([withdrawn_key(i) for i in queued])
    withdrawn = [i for i, mark in zip(queued, marks, strict=True) if mark is not None]
    if not withdrawn:
        return list(rows)
    session.execute(delete(Job).where(Job.id.in_(withdrawn), Job.status == JobStatus.QUEUED))
    redis.delete(*(withdrawn_key(i) for i in withdrawn))
    log.warning("deleted %d jobs withdrawn while Postgres was away", len(withdrawn))
    return [r for r in rows if r.id not in set(withdrawn)]


def retake_orphans() -> list[uuid.UUID]:
    """Predict jobs nobody is running go back to ``queued`` and are sent again, seconds
    after they were orphaned, not a lease later:

    - jobs running under a worker process whose heartbeat key has lapsed (its machine
      died, or it was killed with no one to redeliver its message);
    - jobs running for longer than the predict task's hard time limit, whatever their
      process: a task past that limit has been killed, so no one holds them (a task
      terminated when the broker connection was lost leaves its process alive).

    Only predict jobs: a predict job runs for a batch's milliseconds, so one still running
    after a heartbeat period is in the hands of whoever claimed it, alive or not.
    """
    s = get_settings()
    now = datetime.now(UTC)
    grace = now - timedelta(seconds=s.worker_heartbeat_s)
    overdue = now - timedelta(seconds=s.predict_time_limit_s)
    with session_scope() as session:
        rows = session.execute(
            select(Job.id, Job.worker, Job.priority, Job.started_at)
            .where(
                Job.finished_at.is_(None),
                Job.status == JobStatus.RUNNING,
                Job.type == JobType.PREDICT,
                Job.heartbeat_at < grace,
            )
            .limit(SWEEP_LIMIT)
        ).all()
        if not rows:
            return []
        processes = sorted({(r.worker or "").split("/", 1)[0] for r in rows})
        alive = redis_client().mget([heartbeat_key(p) for p in processes])
        dead = {p for p, seen in zip(processes, alive, strict=True) if seen is None}
        orphans = [
            r
            for r in rows
            if (r.worker or "").split("/", 1)[0] in dead
            or (r.started_at is not None and r.started_at < overdue)
        ]
        if not orphans:
            return []
        # Compare-and-set on the worker too: a job retaken meanwhile is left alone.
        retaken = session.execute(
            update(Job)
            .where(
                Job.id.in_([r.id for r in orphans]),
                Job.status == JobStatus.RUNNING,
                Job.worker.in_({r.worker for r in orphans}),
            )
            .values(status=JobStatus.QUEUED, worker=None, enqueued_at=datetime.now(UTC))
            .returning(Job.id, Job.priority)
        ).all()
    enqueue([(r.id, "predict", r.priority) for r in retaken])
    if retaken:
        log.warning(
            "retook %d predict jobs nobody runs (dead processes %s, or past the time limit)",
            len(retaken),
            sorted(dead),
        )
    return [r.id for r in retaken]


@celery_app.task(name="ops.sweep", queue="ops")
def sweep() -> int:
    return sweep_once() + len(retake_orphans()) + redispatch_stalled_runs() + resend_callbacks()


def redispatch_stalled_runs() -> int:
    """Chunks of running score runs that have not moved for ``INFERQ_SCORE_STALL_S`` are
    sent again: their messages were lost (a Redis restart, a dispatch that failed after
    the plan was committed). A chunk sent twice writes once, so a slow chunk that was only
    late costs a duplicate message, nothing more. A stalled run with every chunk done (its
    last chunk's task was killed between its commit and the close) is closed here.
    Returns the chunks sent."""
    from workers.tasks.score import close_run, dispatch_chunks

    stalled = datetime.now(UTC) - timedelta(seconds=get_settings().score_stall_s)
    with session_scope() as session:
        runs = session.execute(
            update(Job)
            .where(
                Job.finished_at.is_(None),
                Job.status == JobStatus.RUNNING,
                Job.type == JobType.SCORE,
                Job.heartbeat_at < stalled,
            )
            .values(heartbeat_at=datetime.now(UTC))  # not again before another stall period
            .returning(Job.id)
        ).all()
        undone: dict[uuid.UUID, list[int]] = {}
        for (run_id,) in runs:
            undone[run_id] = list(
                session.scalars(
                    select(ScoringChunk.chunk).where(
                        ScoringChunk.run_id == run_id, ScoringChunk.done_at.is_(None)
                    )
                )
            )
    sent = 0
    for run_id, chunks in undone.items():
        if not chunks:
            close_run(run_id)
            log.warning(
                "score run stalled with every chunk done: closed", extra={"job_id": str(run_id)}
            )
        else:
            dispatch_chunks(run_id, chunks)
            sent += len(chunks)
            log.warning(
                "score run stalled: sent its %d undone chunks again",
                len(chunks),
                extra={"job_id": str(run_id)},
            )
    return sent


def resend_callbacks() -> int:
    """Send the callback deliveries that are due (see ``workers.tasks.callbacks``)."""
    from workers.tasks.callbacks import due_deliveries

    due = due_deliveries()
    for job_id in due:
        celery_app.send_task("ops.callback", args=[job_id], queue="ops")
    if due:
        log.info("sent %d due callback deliveries", len(due))
    return len(due)


def schedule_nightly_run(model: str, night: date) -> uuid.UUID | None:
    """Record tonight's run of ``model`` as a score job, once: None if it already exists."""
    s = get_settings()
    with session_scope() as session:
        # Worker commits skip the WAL flush (shared.db.relax_commits); this one must not:
        # beat will not fire again for a night whose record a crash lost.
        durable(session)
        version = production_versions(session).get(model)
        if version is None:
            log.error("nightly scoring of %s skipped: no production version", model)
            return None
        job = Job(
            id=uuid.uuid4(),
            tenant=s.nightly_tenant,
            type=JobType.SCORE,
            model=model,
            model_version=version,
            status=JobStatus.QUEUED,
            priority=Priority.LOW,
            request={"segment": {}},
            meta={"scheduled": "nightly", "night": night.isoformat()},
            idempotency_key=f"nightly:{model}:{night.isoformat()}",
        )
        session.add(job)
        session.add(
            ScoringRun(
                id=job.id,
                job_id=job.id,
                model=model,
                version=version,
                segment={},
                schedule_key=f"{model}:{night.isoformat()}",
                status="queued",
            )
        )
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            log.info("nightly scoring of %s for %s already exists", model, night)
            return None
    enqueue([(job.id, "score", "low")])
    log.info("nightly scoring of %s for %s recorded", model, night, extra={"job_id": str(job.id)})
    return job.id


def scorable_models() -> list[str]:
    """Models whose production version names a feature table: the nightly run's models."""
    with session_scope() as session:
        prod = production_versions(session)
        return sorted(
            v.name
            for v in list_versions(session)
            if prod.get(v.name) == v.version and v.input_schema.get("feature_table")
        )


@celery_app.task(name="ops.nightly_score", queue="ops")
def nightly_score(model: str | None = None) -> str | list[str] | None:
    """Tonight's run of ``model``, or of every model with a feature table (their job ids;
    None or fewer ids for runs that exist already)."""
    night = datetime.now(UTC).date()
    if model is not None:
        job_id = schedule_nightly_run(model, night)
        return str(job_id) if job_id else None
    return [str(j) for m in scorable_models() if (j := schedule_nightly_run(m, night))]


def catch_up_nightly(now: datetime | None = None) -> list[uuid.UUID]:
    """Record the latest scheduled nightly run of each model if it is missing (its trigger
    was lost); the per-night unique key makes this a no-op where the run exists."""
    from workers.beat import last_fire

    now = now or datetime.now(UTC)
    fire = last_fire(get_settings().nightly_score_cron, now)
    if fire is None:
        return []
    caught = [j for m in scorable_models() if (j := schedule_nightly_run(m, fire.date()))]
    if caught:
        log.warning("caught up %d nightly runs of %s", len(caught), fire.date())
    return caught


@celery_app.task(name="ops.nightly_catch_up", queue="ops")
def nightly_catch_up() -> list[str]:
    return [str(j) for j in catch_up_nightly()]


@celery_app.task(name="ops.mlflow_sync", queue="ops")
def mlflow_sync() -> int:
    """Follow MLflow aliases: import and promote versions an alias has moved to."""
    from shared.orm import ModelFollow

    with session_scope() as session:
        if session.scalar(select(ModelFollow.name).limit(1)) is None:
            return 0  # nothing followed: MLflow is never imported
    from shared.models.follow import sync_follows

    return len(sync_follows(session_scope, get_settings().mlflow_tracking_uri))
