"""``train.run``: fit a new model version, register it, promote it per the job's policy."""

from __future__ import annotations

import logging
import threading
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from shared.config import get_settings
from shared.db import session_scope
from shared.jobs import store as jobstore
from shared.jobs.fields import JobStatus
from shared.logs import job_context
from shared.models.training import NotEnoughDataError, train
from shared.orm import Job
from workers.app import celery_app
from workers.process import redis_client, worker_name

log = logging.getLogger(__name__)
HEARTBEAT_S = 15.0


def _heartbeat(job_id: uuid.UUID, stop: threading.Event) -> None:
    """Renew the job's lease while a long fit runs, so the sweeper leaves it alone."""
    while not stop.wait(HEARTBEAT_S):
        try:
            with session_scope() as session:
                jobstore.heartbeat(session, job_id)
        except Exception:
            log.warning("heartbeat failed", exc_info=True)


@celery_app.task(
    name="train.run",
    bind=True,
    soft_time_limit=get_settings().long_soft_time_limit_s,
    time_limit=get_settings().long_time_limit_s,
)
def run(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    jid = uuid.UUID(job_id)
    redis = redis_client()
    with job_context(jid):
        with session_scope() as session:
            claimed = jobstore.claim(session, [jid], worker=worker_name(), task_id=self.request.id)
        job = claimed[0] if claimed else None
        if job is None or job.status != JobStatus.RUNNING:
            jobstore.mirror(redis, [job] if job else [])
            return
        stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(jid, stop), daemon=True).start()
        try:
            with session_scope() as session:
                result = train(session, job.model, promote=job.request.get("promote", "if_better"))
            with session_scope() as session:
                ended = jobstore.finish(session, {jid: result})
                if ended:
                    session.execute(
                        update(Job).where(Job.id == jid).values(model_version=result["version"])
                    )
                    ended[0].model_version = result["version"]
        except (NotEnoughDataError, SoftTimeLimitExceeded) as exc:
            code = "timeout" if isinstance(exc, SoftTimeLimitExceeded) else "not_enough_data"
            with session_scope() as session:
                failed = jobstore.fail(session, jid, code=code, message=str(exc) or code)
            ended = [failed] if failed else []
        finally:
            stop.set()
        jobstore.mirror(redis, ended)
