"""Putting recorded jobs on the broker. Always called after the job rows are committed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from workers.app import PRIORITIES, TASK_FOR_TYPE, celery_app

__all__ = ["enqueue", "PREDICT_BATCH"]

#: Job ids per predict message when re-sending in bulk.
PREDICT_BATCH = 64


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
        # At least two messages when there are two jobs, so two idle worker processes
        # share a batch instead of one taking it all.
        size = min(PREDICT_BATCH, max(1, -(-len(ids) // 2)))
        for i in range(0, len(ids), size):
            celery_app.send_task(
                name,
                args=[ids[i : i + size]],
                queue=queue,
                priority=PRIORITIES.get(priority, 5),
            )
            sent += 1
    return sent
