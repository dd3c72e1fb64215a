"""Micro-batching's protocol: pending lists, the doorbell, and the drain.

Predict jobs are micro-batched, and the broker sees a message per busy spell, not per job:

1. The API commits a batch of jobs, then in one Redis script call (``ANNOUNCE``) pushes
   the predict jobs' ids on a pending list per priority and *then* sets the doorbell
   key (``SET NX``, ``BELL_TTL_MS``). Only if the doorbell was down does it send a
   Celery message (carrying the batch's ids).
2. The worker that takes the message drains: it pops up to ``INFERQ_BATCH_MAX_JOBS``
   pending ids (``pop_pending``, which keeps the doorbell up and the ids on an in-flight
   list of the task's own until its next pop), claims them by primary key, predicts them
   in one call, records them, and pops again. When nothing is pending it blocks for up
   to ``INFERQ_PREDICT_IDLE_S`` on a wake list that every push also feeds
   (``wait_pending``): a job pushed meanwhile is taken the moment it arrives. Commits
   meanwhile find the doorbell up and send nothing: their ids wait for at most one
   batch, never for a message. A task killed between a pop and its claim leaves the ids
   on its in-flight list, and its redelivered message claims them (``in_flight``).
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

from shared.broker import TASK_FOR_TYPE, celery_app
from shared.config import get_settings
from shared.jobs.fields import JobRow, JobType, Priority
from shared.jobs.store import mirror

log = logging.getLogger(__name__)

__all__ = [
    "bell_key",
    "ANNOUNCE",
    "announce_args",
    "pop_pending",
    "wait_pending",
    "mirror_and_pop",
    "in_flight",
    "forget_in_flight",
    "pending_keys",
    "HELP_AFTER_S",
    "restore_pending",
    "hand_over",
    "call_for_help",
    "BELL_TTL_MS",
    "PENDING_TTL_S",
]

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
_PRIORITY_ORDER = (Priority.HIGH, Priority.NORMAL, Priority.LOW)

# KEYS: 1 the doorbell, 2 the wake list, 3 this task's in-flight list, 4.. the pending
# lists, highest priority first. ARGV: 1 how many ids at most; 2 "1" for the last pop
# (doorbell down first), else the doorbell is renewed, if up, for ARGV[3] ms; 4 the
# in-flight list's lifetime, s. Atomic: an id pushed before a failed SET NX of the
# doorbell is always popped, by this pop or a later one. The popped ids are kept on the
# in-flight list until this task's next pop (by then they are claimed), so a task that
# dies between pop and claim leaves them to its redelivered message.
_POP = """
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
redis.call('DEL', KEYS[2], KEYS[3])
local out = {}
local left = tonumber(ARGV[1])
for i = 4, #KEYS do
  if left <= 0 then break end
  local got = redis.call('LPOP', KEYS[i], left)
  if got then
    for _, v in ipairs(got) do out[#out + 1] = v end
    left = left - #got
  end
end
for i = 1, #out, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(out, i, math.min(i + 999, #out)))
end
if #out > 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[4])
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


def _wake_key() -> str:
    return get_settings().key("pending", "predict", "wake")


def _inflight_key(task_id: str) -> str:
    return get_settings().key("pending", "predict", "inflight", task_id)


# What the API sends once a batch of jobs is committed, as one script call: their hot
# copies (SET NX: a worker that already wrote the terminal copy wins), then for predict
# jobs the pending ids, the wake token and, last, the doorbell (the order the protocol
# needs, and atomic besides). One command, not seven for a batch of one: the pipeline's
# per-command cost was most of the API's Redis time at low load.
# KEYS: 1 the doorbell, 2 the wake list, then ARGV[1] hot-copy keys, then the pending
# lists. ARGV: 1 how many hot copies, 2 their lifetime (s), 3 the pending lists' lifetime
# (s), 4 the doorbell's (ms), then the hot copies, then for each pending list the number
# of its ids followed by them. Returns 1 if this call raised the doorbell, else 0.
ANNOUNCE = """
local h = tonumber(ARGV[1])
for i = 1, h do
  redis.call('SET', KEYS[2 + i], ARGV[4 + i], 'EX', ARGV[2], 'NX')
end
if #KEYS == 2 + h then
  return 0
end
local a = 5 + h
for k = 3 + h, #KEYS do
  local n = tonumber(ARGV[a])
  for i = a + 1, a + n, 1000 do
    redis.call('RPUSH', KEYS[k], unpack(ARGV, i, math.min(i + 999, a + n)))
  end
  redis.call('EXPIRE', KEYS[k], ARGV[3])
  a = a + 1 + n
end
redis.call('RPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then
  return 1
end
return 0
"""


def announce_args(
    hot: Sequence[tuple[str, str]], hot_ttl_s: int, jobs: Iterable[tuple[uuid.UUID, str]]
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``ANNOUNCE`` for hot copies (key, document) kept ``hot_ttl_s``
    and committed predict jobs' (id, priority)."""
    by_priority: dict[str, list[str]] = {}
    for job_id, priority in jobs:
        key = _pending_key(priority if priority in _PRIORITY_ORDER else Priority.NORMAL)
        by_priority.setdefault(key, []).append(str(job_id))
    keys = [bell_key(), _wake_key(), *(k for k, _ in hot), *by_priority]
    args: list[Any] = [len(hot), hot_ttl_s, PENDING_TTL_S, BELL_TTL_MS, *(d for _, d in hot)]
    for ids in by_priority.values():
        args += [len(ids), *ids]
    return keys, args


def _pop_args(task_id: str, limit: int, last: bool) -> tuple[list[str], list[Any]]:
    keys = [bell_key(), _wake_key(), _inflight_key(task_id)]
    keys += [_pending_key(p) for p in _PRIORITY_ORDER]
    return keys, [limit, "1" if last else "0", BELL_TTL_MS, get_settings().visibility_timeout_s]


def pop_pending(redis: Redis, task_id: str, limit: int, *, last: bool = False) -> list[uuid.UUID]:
    """Up to ``limit`` pending predict job ids for task ``task_id``, high priority first,
    oldest first, in one round trip. ``last`` takes the doorbell down first (the worker
    is about to stop)."""
    keys, args = _pop_args(task_id, limit, last)
    return _ids(redis.register_script(_POP)(keys=keys, args=args))


def mirror_and_pop(
    redis: Redis, ended: Sequence[JobRow], task_id: str, limit: int, *, pipe: Any = None
) -> list[uuid.UUID]:
    """The hot copies of jobs a batch ended (``shared.jobs.store.mirror``) and the next
    ``pop_pending``, in one round trip; with ``pipe``, on it, after what it holds."""
    if pipe is None:
        pipe = redis.pipeline(transaction=False)
    mirror(redis, ended, pipe=pipe)
    keys, args = _pop_args(task_id, limit, last=False)
    pipe.eval(_POP, len(keys), *keys, *args)
    return _ids(pipe.execute()[-1])


def in_flight(redis: Redis, task_id: str) -> list[uuid.UUID]:
    """What task ``task_id`` had popped and perhaps not claimed when it stopped (read by
    its redelivered message)."""
    return _ids(redis.lrange(_inflight_key(task_id), 0, -1))


def forget_in_flight(redis: Redis, task_id: str) -> None:
    """The task ends with every popped id claimed."""
    redis.delete(_inflight_key(task_id))


def _ids(popped: Any) -> list[uuid.UUID]:
    return [uuid.UUID(v.decode() if isinstance(v, bytes) else v) for v in popped or []]


def wait_pending(redis: Redis, timeout: float) -> bool:
    """Block until predict jobs are pushed (True) or ``timeout`` seconds pass (False)."""
    return redis.blpop([_wake_key()], timeout=timeout) is not None


def restore_pending(redis: Redis, job_ids: list[uuid.UUID]) -> None:
    """Put popped ids back at the head of the line (a claim failed); best effort: what
    this loses the sweeper re-sends."""
    if not job_ids:
        return
    try:
        redis.lpush(_pending_key(_PRIORITY_ORDER[0]), *(str(i) for i in reversed(job_ids)))
    except Exception:
        log.warning("could not restore %d pending ids", len(job_ids), exc_info=True)


def hand_over() -> None:
    """A message for the next delivery to go on draining (the doorbell stays up)."""
    name, queue = TASK_FOR_TYPE[JobType.PREDICT]
    celery_app.send_task(name, args=[[]], queue=queue)


def call_for_help(redis: Redis) -> bool:
    """One more draining delivery, at most once per ``BELL_TTL_MS``: a backlog is building."""
    if not redis.set(get_settings().key("bell", "predict-help"), "1", nx=True, px=BELL_TTL_MS):
        return False
    hand_over()
    return True
