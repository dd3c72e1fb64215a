"""``predict.run``: online predictions for one or more queued jobs."""

from __future__ import annotations

import logging
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from shared import jobs as jobstore
from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.inference import run_predict_jobs, write_prediction_logs
from shared.jobs import JobStatus
from shared.logs import job_context
from workers.app import celery_app
from workers.dispatch import ring_predict
from workers.runtime import models, redis_client, worker_name

log = logging.getLogger(__name__)


@celery_app.task(
    name="predict.run",
    bind=True,
    # A database or Redis blip is worth another try; a bug is not (no blanket autoretry).
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=True,
    max_retries=5,
)
def run(self, job_ids: list[str]) -> int:  # type: ignore[no-untyped-def]
    """Claim the message's jobs and every other queued predict job (up to
    INFERQ_BATCH_MAX_JOBS), predict them together, record results and logs at once."""
    ids = [uuid.UUID(i) for i in job_ids]
    redis = redis_client()
    s = get_settings()
    # Before claiming: a job committed from now on rings again (see ring_predict).
    redis.delete(s.key("bell", "predict"))
    with session_scope() as session:
        claimed = jobstore.claim(
            session, ids, worker=worker_name(), task_id=self.request.id, drain=s.batch_max_jobs
        )
    jobstore.mirror(redis, [j for j in claimed if j.status in jobstore.TERMINAL])
    runnable = [j for j in claimed if j.status == JobStatus.RUNNING]
    if len(claimed) >= s.batch_max_jobs + len(ids):
        # A full batch: more may be waiting; let another delivery (or process) go on.
        ring_predict(redis, [], even_empty=True)
    if not runnable:
        return 0
    with job_context(",".join(str(j.id) for j in runnable[:20])):
        try:
            with session_scope() as session:
                out = run_predict_jobs(session, get_engine(), redis, models, runnable)
                write_prediction_logs(session, out.logs)
                progress = {
                    jid: {"done": len(r["predictions"]), "total": len(r["predictions"])}
                    for jid, r in out.results.items()
                }
                ended = jobstore.finish(session, out.results, progress=progress)
                for jid, (code, message) in out.errors.items():
                    job = jobstore.fail(session, jid, code=code, message=message)
                    if job is not None:
                        ended.append(job)
        except SoftTimeLimitExceeded:
            log.error("predict batch hit its soft time limit")
            with session_scope() as session:
                ended = [
                    j
                    for j in (
                        jobstore.fail(
                            session,
                            job.id,
                            code="timeout",
                            message="the job exceeded its time limit",
                        )
                        for job in runnable
                    )
                    if j is not None
                ]
        jobstore.mirror(redis, ended)
        log.info("predicted a batch of %d jobs", len(runnable))
    return len(ended)
