"""Putting recorded jobs on the broker. Always called after the job rows are committed.

Predict jobs are micro-batched, and the broker sees a message per busy spell, not per job:

1. The API commits a batch of jobs, then in one Redis pipeline pushes the predict jobs'
   ids on a pending list per priority (``push_pending``) and *then* sets the doorbell
   key (``SET NX``, ``BELL_TTL_MS``). Only if the doorbell was down does it send a
   Celery message (carrying the batch's ids).
2. The worker that takes the message drains: it pops up to ``INFERQ_BATCH_MAX_JOBS``
   pending ids (``pop_pending``, which keeps the doorbell up), claims them by primary
   key, predicts them in one call, records them, and pops again. When nothing is
   pending it blocks on the lists for up to ``INFERQ_PREDICT_IDLE_S`` (``wait_pending``):
   a job pushed meanwhile is taken the moment it arrives. Commits meanwhile find the
   doorbell up and send nothing: their ids wait for at most one batch, never for a
   message.
3. When the wait times out the worker takes the doorbell down and pops once more in the
   same atomic step (``pop_pending(..., last=True)``): anything pushed before that is
   still taken, and any commit after it rings again. A worker that has drained for
   ``INFERQ_PREDICT_DRAIN_S`` hands over to a fresh message instead (``hand_over``), so
   no task runs long. A batch too big for one model call, a pop that fills a whole
   batch, or work still pending after a batch slower than ``HELP_AFTER_S``, asks
   another process to drain too (``call_for_help``).

Idle, every commit rings at once and a job is a batch of one. If Redis loses a pending
list, the jobs are still queued in the ledger, where the sweeper finds them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from redis import Redis

from shared.config import get_settings
from shared.jobs import JobRow, ended_hooks, mirror
from shared.orm import Job
from workers.app import PRIORITIES, TASK_FOR_TYPE, celery_app

log = logging.getLogger(__name__)

__all__ = [
    "enqueue",
    "bell_key",
    "push_pending",
    "pop_pending",
    "wait_pending",
    "mirror_and_pop",
    "pending_keys",
    "HELP_AFTER_S",
    "restore_pending",
    "hand_over",
    "call_for_help",
    "PREDICT_BATCH",
    "BELL_TTL_MS",
    "PENDING_TTL_S",
]

#: Job ids per predict message when re-sending in bulk.
PREDICT_BATCH = 64
#: The doorbell lives this long unless a draining worker's pops renew it: a worker that
#: died holding it delays new jobs by this much at most (its message is redelivered too).
BELL_TTL_MS = 2000
#: A batch that took longer than this, with more jobs pending after it, calls another
#: process for help: one process's model calls cannot keep up.
HELP_AFTER_S = 0.05
#: The pending lists expire this long after their last push; the ledger stays the record
#: (the sweeper re-sends any queued job they lost).
PENDING_TTL_S = 24 * 3600
#: Pending lists are popped in this order.
_PRIORITY_ORDER = ("high", "normal", "low")

# KEYS[1] the doorbell, KEYS[2..] the pending lists, highest priority first. ARGV[1] how
# many ids at most; ARGV[2] "1" for the last pop (doorbell down first), else the doorbell
# is renewed (if up) for ARGV[3] ms. Atomic: an id pushed before a failed SET NX of the
# doorbell is always popped, by this pop or a later one.
_POP = """
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local out = {}
local left = tonumber(ARGV[1])
for i = 2, #KEYS do
  if left <= 0 then break end
  local got = redis.call('LPOP', KEYS[i], left)
  if got then
    for _, v in ipairs(got) do out[#out + 1] = v end
    left = left - #got
  end
end
return out
"""


def bell_key() -> str:
    """The predict doorbell: up while some predict delivery is pending or draining."""
    return get_settings().key("bell", "predict")


def _pending_key(priority: str) -> str:
    return get_settings().key("pending", "predict", priority)


def pending_keys() -> dict[str, str]:
    """Priority -> the Redis list of its pending predict job ids (for metrics)."""
    return {p: _pending_key(p) for p in _PRIORITY_ORDER}


def push_pending(pipe: Any, jobs: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Queue committed predict jobs' (id, priority), in a pipeline that sets the doorbell
    *afterwards*."""
    by_priority: dict[str, list[str]] = {}
    for job_id, priority in jobs:
        by_priority.setdefault(priority, []).append(str(job_id))
    for priority, ids in by_priority.items():
        key = _pending_key(priority if priority in _PRIORITY_ORDER else "normal")
        pipe.rpush(key, *ids)
        pipe.expire(key, PENDING_TTL_S)


def pop_pending(redis: Redis, limit: int, *, last: bool = False) -> list[uuid.UUID]:
    """Up to ``limit`` pending predict job ids, high priority first, oldest first, in one
    round trip. ``last`` takes the doorbell down first (the worker is about to stop)."""
    keys = [bell_key(), *(_pending_key(p) for p in _PRIORITY_ORDER)]
    args = [limit, "1" if last else "0", BELL_TTL_MS]
    return _ids(redis.register_script(_POP)(keys=keys, args=args))


def mirror_and_pop(redis: Redis, ended: Sequence[JobRow], limit: int) -> list[uuid.UUID]:
    """The hot copies of jobs a batch ended (``shared.jobs.mirror``) and the next
    ``pop_pending``, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    mirror(redis, ended, pipe=pipe)
    keys = [bell_key(), *(_pending_key(p) for p in _PRIORITY_ORDER)]
    pipe.eval(_POP, len(keys), *keys, limit, "0", BELL_TTL_MS)
    return _ids(pipe.execute()[-1])


def _ids(popped: Any) -> list[uuid.UUID]:
    return [uuid.UUID(v.decode() if isinstance(v, bytes) else v) for v in popped or []]


def wait_pending(redis: Redis, timeout: float) -> uuid.UUID | None:
    """Block until a pending predict job id arrives (highest priority first), or None
    after ``timeout`` seconds."""
    got = redis.blpop([_pending_key(p) for p in _PRIORITY_ORDER], timeout=timeout)
    if got is None:
        return None
    value = got[1]
    return uuid.UUID(value.decode() if isinstance(value, bytes) else value)


def restore_pending(redis: Redis, job_ids: list[uuid.UUID]) -> None:
    """Put popped ids back at the head of the line (a claim failed); best effort: what
    this loses the sweeper re-sends."""
    if not job_ids:
        return
    try:
        redis.lpush(_pending_key(_PRIORITY_ORDER[0]), *(str(i) for i in reversed(job_ids)))
    except Exception:
        log.warning("could not restore %d pending ids", len(job_ids), exc_info=True)


def _send_drain() -> None:
    name, queue = TASK_FOR_TYPE["predict"]
    celery_app.send_task(name, args=[[]], queue=queue)


def hand_over() -> None:
    """A message for the next delivery to go on draining (the doorbell stays up)."""
    _send_drain()


def call_for_help(redis: Redis) -> bool:
    """One more draining delivery, at most once per ``BELL_TTL_MS``: a backlog is building."""
    if not redis.set(get_settings().key("bell", "predict-help"), "1", nx=True, px=BELL_TTL_MS):
        return False
    _send_drain()
    return True


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


def _send_callbacks(jobs: Sequence[Job | JobRow]) -> None:
    """Queue one ``ops.callback`` delivery per ended job that asked for one."""
    for job in jobs:
        if (job.request or {}).get("callback_url"):
            celery_app.send_task("ops.callback", args=[str(job.id)], queue="ops")


ended_hooks.append(_send_callbacks)
