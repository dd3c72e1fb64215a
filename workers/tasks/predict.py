"""``predict.run``: online predictions, micro-batched, for as long as jobs keep coming."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from shared.batching.inference import prediction_logs, run_predict_jobs
from shared.batching.pending import (
    HELP_AFTER_S,
    call_for_help,
    forget_in_flight,
    hand_over,
    in_flight,
    mirror_and_pop,
    pop_pending,
    restore_pending,
    wait_pending,
)
from shared.config import get_settings
from shared.db import autocommit, get_engine, session_scope
from shared.jobs import store as jobstore
from shared.jobs.fields import JobRow, JobStatus
from shared.logs import job_context
from shared.monitoring.shadow import Shadows, Work
from workers.app import celery_app
from workers.process import cache_client, models, redis_client, worker_name

log = logging.getLogger(__name__)
#: The shadow versions this process serves (re-read every INFERQ_MODEL_POLL_S).
shadows = Shadows()

_TIMEOUT: dict[str, str] = {"code": "timeout", "message": "the job exceeded its time limit"}


@celery_app.task(
    name="predict.run",
    bind=True,
    # A database or Redis blip is worth another try; a bug is not (no blanket autoretry).
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=True,
    max_retries=5,
)
def run(self, job_ids: list[str]) -> int:  # type: ignore[no-untyped-def]
    """Predict the message's jobs and every pending predict job, a batch at a time, until
    none is pending (see ``shared.batching.pending`` for the protocol); returns the jobs ended.

    Each batch costs three round trips whatever its size, four with the prediction cache
    on (its lookup): the claim, the results with their prediction logs (one
    transaction), and the batch's hot copies, counters and new cache entries, sent with
    the next pop.
    """
    s = get_settings()
    redis = redis_client()
    cap = s.batch_max_jobs
    task_id = self.request.id
    ids = [uuid.UUID(i) for i in job_ids]
    # A message back from a dead worker (or a retry) retakes what its first run held: the
    # jobs it claimed (running under this task id) and the ids it had popped.
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    redelivered = redelivered or self.request.retries > 0
    if redelivered:
        ids += in_flight(redis, task_id)
    deadline = time.monotonic() + s.predict_drain_s
    done: list[JobRow] = []  # ended by the last batch, hot copies not yet written
    shadow: list[Work] = []  # sampled rows kept for the shadow versions
    ended = batches = 0
    slow = False
    # Sent with the next pop (or at the end); a pipeline is empty again once sent.
    writes = redis.pipeline(transaction=False)
    with autocommit() as conn, _sent_on_error(writes):
        while True:
            popped = mirror_and_pop(redis, done, task_id, cap, pipe=writes)
            done = []
            if shadow and shadows.due(shadow):  # kept too long or too many: run them now
                shadows.run(conn, models, shadow, session_scope)
                shadow = []
            if not ids and not popped and not redelivered:
                if wait_pending(redis, s.predict_idle_s):
                    continue  # jobs were pushed: pop them
                if shadow:  # no job for predict_idle_s: the shadow's turn, then look again
                    shadows.run(conn, models, shadow, session_scope)
                    shadow = []
                    continue
                popped = pop_pending(redis, task_id, cap, last=True)  # doorbell down
                if not popped:
                    break
            if len(popped) >= cap or (slow and popped):
                call_for_help(redis)  # a backlog, or batches too slow for one process
            started = time.monotonic()
            done, sampled = _run_batch(task_id, conn, redis, ids, popped, redelivered, writes)
            shadow = shadows.keep(shadow, sampled)
            slow = time.monotonic() - started > HELP_AFTER_S
            ids, redelivered = [], False
            ended, batches = ended + len(done), batches + 1
            if time.monotonic() >= deadline:
                jobstore.mirror(redis, done, pipe=writes)
                writes.execute()
                forget_in_flight(redis, task_id)  # claimed; a last pop would have cleared it
                hand_over()  # the next delivery drains while this one runs the shadow
                shadows.run(conn, models, shadow, session_scope)
                break
    if batches > 1:
        log.info("drained %d predict jobs in %d batches", ended, batches)
    return ended


@contextlib.contextmanager
def _sent_on_error(writes: Any) -> Iterator[None]:
    """Counters queued for the next pop still go out when the drain fails on its way."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            writes.execute()
        raise


def _run_batch(
    task_id: str,
    conn: Connection,
    redis: Redis,
    ids: list[uuid.UUID],
    popped: list[uuid.UUID],
    redelivered: bool,
    writes: Any,
) -> tuple[list[JobRow], list[Work]]:
    """Claim, predict and record one batch; returns the jobs it ended (their hot copies are
    the caller's to write) and its rows sampled for shadow versions; its counters and cache
    entries are queued on ``writes``."""
    try:
        claimed = jobstore.claim_batch(
            conn,
            list(dict.fromkeys([*ids, *popped])),
            worker=worker_name(),
            task_id=task_id,
            redelivered=redelivered,
        )
    except Exception:
        restore_pending(redis, popped)  # next in line again, not left to the sweeper
        raise
    ended = [j for j in claimed if j.status in jobstore.TERMINAL]  # too many attempts
    runnable = [j for j in claimed if j.status == JobStatus.RUNNING]
    rows = sum(len(j.request.get("inputs") or j.request.get("entity_ids") or ()) for j in runnable)
    if rows > get_settings().batch_max_rows:
        call_for_help(redis)  # several model calls' worth: share them with another process
    work: list[Work] = []
    if runnable:
        settled, work = _predict(conn, redis, runnable, writes)
        ended += settled
    return ended, work


def _predict(
    conn: Connection, redis: Redis, jobs: list[JobRow], writes: Any
) -> tuple[list[JobRow], list[Work]]:
    with job_context(",".join(str(j.id) for j in jobs[:20])):
        try:
            out = run_predict_jobs(
                get_engine(), redis, models, jobs, cache=cache_client(), writes=writes
            )
        except SoftTimeLimitExceeded:
            log.error("predict batch hit its soft time limit")
            timeout: dict[uuid.UUID, jobstore.End] = {
                j.id: (JobStatus.FAILED, None, _TIMEOUT) for j in jobs
            }
            return jobstore.settle_batch(conn, jobs, timeout), []
        ends: dict[uuid.UUID, jobstore.End] = {
            jid: (JobStatus.SUCCEEDED, result, None) for jid, result in out.results.items()
        }
        for jid, (code, message) in out.errors.items():
            ends[jid] = (JobStatus.FAILED, None, {"code": code, "message": message})
        progress = {
            jid: {"done": len(r["predictions"]), "total": len(r["predictions"])}
            for jid, r in out.results.items()
        }
        settled = jobstore.settle_batch(
            conn, jobs, ends, progress=progress, before=prediction_logs(out.logs)
        )
        log.debug("predicted a batch of %d jobs", len(jobs))
        succeeded = {j.id for j in settled if j.status == JobStatus.SUCCEEDED}
        logs = [entry for entry in out.logs if entry["job_id"] in succeeded]
        return settled, shadows.plan(logs, session_scope)
