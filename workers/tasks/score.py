"""``score.run`` plans a population scoring run; ``score.chunk`` tasks, shared by every
worker process, score it; the chunk that completes the run closes the job."""

from __future__ import annotations

import logging
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.jobs import store as jobstore
from shared.jobs.fields import JobStatus
from shared.logs import job_context
from shared.models.formats import ArtifactError
from shared.models.registry import ArtifactIntegrityError
from shared.monitoring.reports import NoReferenceError, publish, run_report
from shared.orm import ScoringChunk, ScoringRun
from shared.scoring.chunk import ChunkOutcome, score_chunk
from shared.scoring.plan import finalize, plan
from workers.app import celery_app
from workers.process import models, redis_client, worker_name

log = logging.getLogger(__name__)
#: Both tasks: long time limits, and another try for a database or Redis blip (a bug is
#: not retried: no blanket autoretry).
_TASK_OPTIONS = {
    "bind": True,
    "soft_time_limit": get_settings().long_soft_time_limit_s,
    "time_limit": get_settings().long_time_limit_s,
    "autoretry_for": (OperationalError, RedisConnectionError),
    "retry_backoff": True,
    "max_retries": 5,
}


def dispatch_chunks(run_id: uuid.UUID, chunks: list[int], priority: int = 5) -> None:
    for chunk in chunks:
        celery_app.send_task(
            "score.chunk", args=[str(run_id), chunk], queue="score", priority=priority
        )


def close_run(run_id: uuid.UUID) -> None:
    """Finish the job if this run is complete (any chunk may be the last)."""
    with session_scope() as session:
        result = finalize(session, run_id, public_url=get_settings().public_url)
        ended = jobstore.finish(session, {run_id: result}) if result is not None else []
    jobstore.mirror(redis_client(), ended)
    if ended:
        log.info("scoring run %s finished: %s rows", run_id, result and result["rows_scored"])
        report_drift(run_id)


def report_drift(run_id: uuid.UUID) -> None:
    """The run's drift report, after its job has ended (never delaying it, never failing
    it: a version without a reference profile has none)."""
    try:
        with session_scope() as session:
            report = run_report(session, run_id)
        publish(redis_client(), report)
        log.info("drift report of run %s: drifted=%s", run_id, report.drifted)
    except NoReferenceError as exc:
        log.info("no drift report for run %s: %s", run_id, exc)
    except Exception:
        log.exception("drift report of run %s failed", run_id)


def _fail(job_id: uuid.UUID, code: str, message: str) -> None:
    with session_scope() as session:
        job = jobstore.fail(session, job_id, code=code, message=message)
        session.execute(update(ScoringRun).where(ScoringRun.id == job_id).values(status="failed"))
    jobstore.mirror(redis_client(), [job] if job else [])


@celery_app.task(name="score.run", **_TASK_OPTIONS)
def run(self, job_id: str) -> int:  # type: ignore[no-untyped-def]
    jid = uuid.UUID(job_id)
    with job_context(jid):
        with session_scope() as session:
            claimed = jobstore.claim(session, [jid], worker=worker_name(), task_id=self.request.id)
            job = claimed[0] if claimed else None
            if job is None or job.status != JobStatus.RUNNING:
                ended = [job] if job else []
                todo = None
            else:
                ended = []
                try:
                    chunks = plan(session, job, chunk_rows=get_settings().score_chunk_rows)
                except LookupError as exc:  # the version lost its feature table
                    session.rollback()
                    failed = jobstore.fail(session, jid, code="model_unavailable", message=str(exc))
                    ended = [failed] if failed else []
                    chunks = None
                todo = None if chunks is None else [c.chunk for c in chunks]
        jobstore.mirror(redis_client(), ended)
        if todo is None:
            return 0
        dispatch_chunks(jid, todo)
        log.info("dispatched %d chunks", len(todo))
        if not todo:
            close_run(jid)
        return len(todo)


@celery_app.task(name="score.chunk", **_TASK_OPTIONS)
def chunk(self, run_id: str, chunk_no: int) -> str:  # type: ignore[no-untyped-def]
    rid = uuid.UUID(run_id)
    s = get_settings()
    with job_context(rid):
        with session_scope() as session:
            # Attempts are counted in the database: a chunk that kills its worker each time
            # fails the run instead of being re-queued for ever.
            attempts = session.execute(
                update(ScoringChunk)
                .where(ScoringChunk.run_id == rid, ScoringChunk.chunk == chunk_no)
                .values(attempts=ScoringChunk.attempts + 1)
                .returning(ScoringChunk.attempts)
            ).scalar()
            run = session.get(ScoringRun, rid)
            if attempts is None or run is None:
                return "unknown"
            name, version = run.model, run.version
        if attempts > s.max_attempts:
            _fail(
                rid,
                "too_many_attempts",
                f"chunk {chunk_no} failed {s.max_attempts} times (worker died or timed out)",
            )
            return "failed"
        try:
            with session_scope() as session:
                model = models.get(session, name, version)
        except (LookupError, ArtifactIntegrityError, ArtifactError, OSError) as exc:
            _fail(rid, "model_unavailable", f"{name} v{version}: {exc}")
            return "failed"
        try:
            outcome = score_chunk(get_engine(), model, rid, chunk_no)
        except SoftTimeLimitExceeded:
            _fail(rid, "timeout", f"chunk {chunk_no} exceeded its time limit")
            return "failed"
        except (OperationalError, RedisConnectionError):
            raise  # retried
        except Exception as exc:
            # The model could not score these rows: a bug in the data or the model, not
            # worth a retry, and the run cannot succeed without the chunk.
            log.exception("chunk %s could not be scored", chunk_no)
            _fail(rid, "prediction_failed", f"chunk {chunk_no}: {type(exc).__name__}: {exc}")
            return "failed"
        if outcome != ChunkOutcome.JOB_ENDED:
            close_run(rid)
        return outcome
