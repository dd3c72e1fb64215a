"""Putting recorded jobs on the broker. Always called after the job rows are committed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from redis import Redis

from shared.config import get_settings
from shared.jobs import ended_hooks
from shared.orm import Job
from workers.app import PRIORITIES, TASK_FOR_TYPE, celery_app

__all__ = ["enqueue", "ring_predict", "PREDICT_BATCH", "BELL_TTL_MS"]

#: Job ids per predict message when re-sending in bulk.
PREDICT_BATCH = 64
#: A pending doorbell lives this long at most: past it, the next commit rings again even
#: if the first message has not been taken yet (a duplicate costs only an empty claim).
BELL_TTL_MS = 2000


def ring_predict(
    redis: Redis, jobs: list[tuple[uuid.UUID, str, str]], *, even_empty: bool = False
) -> int:
    """Put committed predict jobs in the way of a worker, sending a message only if none
    is pending.

    Workers take every queued predict job from the ledger when a message arrives (see
    ``shared.jobs.claim``), so one pending message serves all jobs committed before it is
    taken: the worker deletes the doorbell key *before* it claims, so a job committed
    after that rings again. Under load this turns a message per commit into a message
    per batch; idle, every commit still rings at once.
    """
    if not jobs and not even_empty:
        return 0
    if not redis.set(get_settings().key("bell", "predict"), "1", nx=True, px=BELL_TTL_MS):
        return 0
    if not jobs:  # a message that only drains what is queued
        name, queue = TASK_FOR_TYPE["predict"]
        celery_app.send_task(name, args=[[]], queue=queue)
        return 1
    return enqueue(jobs)


def enqueue(jobs: Iterable[tuple[uuid.UUID, str, str]]) -> int:
    """Send (id, type, priority) jobs; predict jobs of one priority share messages.

    Raises kombu's connection errors when the broker is down: the caller decides
    whether that is a 503 (API) or a retry later (sweeper).
    """
    predict: dict[str, list[str]] = {}
    sent = 0
    for job_id, job_type, priority in jobs:
        if job_type == "predict":
            predict.setdefault(priority, []).append(str(job_id))
            continue
        name, queue = TASK_FOR_TYPE[job_type]
        celery_app.send_task(
            name, args=[str(job_id)], queue=queue, priority=PRIORITIES.get(priority, 5)
        )
        sent += 1
    name, queue = TASK_FOR_TYPE["predict"]
    for priority, ids in predict.items():
        for i in range(0, len(ids), PREDICT_BATCH):
            celery_app.send_task(
                name,
                args=[ids[i : i + PREDICT_BATCH]],
                queue=queue,
                priority=PRIORITIES.get(priority, 5),
            )
            sent += 1
    return sent


def _send_callbacks(jobs: list[Job]) -> None:
    """Queue one ``ops.callback`` delivery per ended job that asked for one."""
    for job in jobs:
        if (job.request or {}).get("callback_url"):
            celery_app.send_task("ops.callback", args=[str(job.id)], queue="ops")


ended_hooks.append(_send_callbacks)
