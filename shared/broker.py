"""The broker as both sides see it: queue and task names, priorities, the Celery app
configured from inferq's settings, and the calls that send: ``enqueue`` (jobs),
``send_callbacks`` (deliveries of ended jobs).

The API only sends with it; ``workers.app`` adds the task modules and the beat schedule
for the worker and beat processes, so the API process never imports a task or the
schedule. Predict jobs mostly travel without a message of their own: see
``shared.batching.pending`` for the micro-batching protocol.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

# BLAS/OpenMP pools must be pinned before numpy loads: N prefork processes each spawning
# one thread per core made a 2-process worker on 2 cores run 40x slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from celery import Celery  # noqa: E402
from kombu import Queue  # noqa: E402

from shared.config import get_settings  # noqa: E402
from shared.jobs.fields import JobType, Priority  # noqa: E402

__all__ = [
    "celery_app",
    "make_app",
    "QUEUES",
    "PRIORITIES",
    "TASK_FOR_TYPE",
    "CALLBACK_TASK",
    "PREDICT_BATCH",
    "enqueue",
    "send_callbacks",
]

QUEUES = ("predict", "score", "ops")
#: Redis emulates priorities with one list per step; a lower number is served first.
PRIORITIES: dict[str, int] = {Priority.HIGH: 0, Priority.NORMAL: 5, Priority.LOW: 9}
#: Job type → (task name, queue).
TASK_FOR_TYPE: dict[str, tuple[str, str]] = {
    JobType.PREDICT: ("predict.run", "predict"),
    JobType.SCORE: ("score.run", "score"),
    JobType.TRAIN: ("train.run", "ops"),
}
#: (task name, queue) of one callback delivery.
CALLBACK_TASK = ("ops.callback", "ops")
#: Job ids per predict message when sending in bulk.
PREDICT_BATCH = 64


def make_app() -> Celery:
    s = get_settings()
    app = Celery("inferq", broker=s.broker_url)
    transport = {
        "visibility_timeout": s.visibility_timeout_s,
        "priority_steps": sorted(set(PRIORITIES.values())),
        "sep": ":",
        "queue_order_strategy": "priority",
        "global_keyprefix": f"{s.redis_prefix}:celery:",
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "health_check_interval": 15,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,  # results live in the job store, never in Celery's backend
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # SIGTERM is remapped to a soft shutdown by `inferq worker`: running tasks get this
        # long to finish, then what the worker still holds goes back to the queue.
        worker_soft_shutdown_timeout=10.0,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="predict",
        task_default_priority=PRIORITIES[Priority.NORMAL],
        task_queue_max_priority=None,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        task_soft_time_limit=s.predict_soft_time_limit_s,
        task_time_limit=s.predict_time_limit_s,
        # No task-sent events: one more Redis publish per message on the API's hot path;
        # Flower sees every task from the worker's received/started/succeeded events.
        task_send_sent_event=False,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=600_000,  # KiB: a leaking child is replaced, not the host
        timezone="UTC",
        enable_utc=True,
        beat_schedule_filename=str(s.data_dir / "celerybeat-schedule"),
    )
    return app


celery_app = make_app()


def enqueue(jobs: Iterable[tuple[uuid.UUID, str, str]]) -> int:
    """Send (id, type, priority) jobs; predict jobs of one priority share messages.
    Always called after the job rows are committed.

    Raises kombu's connection errors when the broker is down: the caller decides
    whether that is a 503 (API) or a retry later (sweeper).
    """
    predict: dict[str, list[str]] = {}
    sent = 0
    for job_id, job_type, priority in jobs:
        if job_type == JobType.PREDICT:
            predict.setdefault(priority, []).append(str(job_id))
            continue
        name, queue = TASK_FOR_TYPE[JobType(job_type)]
        celery_app.send_task(
            name, args=[str(job_id)], queue=queue, priority=PRIORITIES.get(priority, 5)
        )
        sent += 1
    name, queue = TASK_FOR_TYPE[JobType.PREDICT]
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


def send_callbacks(jobs: Sequence[Any]) -> None:
    """One callback delivery message per ended job that asked for one (the outbox row
    was written with its end; see ``shared.jobs.callbacks``)."""
    name, queue = CALLBACK_TASK
    for job in jobs:
        if (job.request or {}).get("callback_url"):
            celery_app.send_task(name, args=[str(job.id)], queue=queue)
