"""Group commit: jobs submitted together share one INSERT, one commit and one Redis round trip.

Requests hand their job rows to the committer and wait. Whatever has arrived by the end of
the current event-loop turn becomes a batch, never waiting for more: idle, a request is a
batch of one. A batch is recorded in one autocommitted multi-row ``INSERT`` (one round
trip, durable before it answers), then announced in one Redis script call: the hot copies of
the new jobs and, for predict jobs, their pending ids and the doorbell (see
``shared.batching.pending``). Only if the doorbell was down, or for job types that are not
micro-batched, does a Celery message go out. Only then are the requests answered 202.

Up to ``CONNECTIONS`` batches are in flight at once, each on its own connection: while
one waits for its commit, the next is already being sent.

A 503 means the job is certainly not recorded, or certainly will not run:

- The INSERT fails with an answer (or the server gives up on it, ``statement_timeout``):
  nothing was written.
- The INSERT's answer is lost (the connection broke, the server crashed): it may have
  committed. The batch is withdrawn by id (deleted while still queued), retried for a few
  seconds; a job found taken meanwhile was recorded after all, and is answered 202. If
  Postgres cannot be reached for the withdrawal, a withdrawal mark goes to Redis, and the
  sweeper deletes a marked job instead of sending it. Only if both fail is the answer
  "outcome unknown" (``OutcomeUnknownError``: 503 with the job id to look up, or the same
  Idempotency-Key to retry with).
- Redis or the broker fails after the commit: the batch is withdrawn the same way; a job
  that cannot be withdrawn (a worker took it) is still recorded, so it is answered 202 and
  the sweeper sends it if need be.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import psycopg2.errors
from redis.commands.core import AsyncScript

from api.deps import redis_async
from api.pgasync import AsyncConnection
from api.waiter import waiter
from shared.batching.pending import ANNOUNCE, announce_args, bell_key
from shared.broker import enqueue
from shared.config import get_settings
from shared.db import libpq_dsn
from shared.jobs.fields import (
    INSERTED,
    JobRow,
    JobType,
    column_list,
    db_values,
    hot_copy,
    placeholders,
)
from shared.jobs.store import WITHDRAWN_TTL_S, withdrawn_key
from shared.sql import Statement

__all__ = [
    "GroupCommitter",
    "submitter",
    "DatabaseUnavailableError",
    "BrokerUnavailableError",
    "IdempotencyKeyTakenError",
    "JobRejectedError",
    "OutcomeUnknownError",
]

log = logging.getLogger(__name__)

#: Jobs per commit at most; a bigger backlog simply takes several commits.
MAX_BATCH = 1000
#: Batches in flight at once (each with its own connection).
CONNECTIONS = 2
#: Seconds a connect or an insert may take before the batch is answered 503.
DB_TIMEOUT_S = 5.0
#: The server gives up on a statement first, so an INSERT the API has stopped waiting for
#: can never commit afterwards behind its 503 (a client-side timeout alone leaves it
#: running on the server, for instance queued behind a lock, to commit later).
STATEMENT_TIMEOUT_MS = int((DB_TIMEOUT_S - 1.0) * 1000)
#: Tries, and seconds between them, to withdraw a batch whose INSERT answer was lost.
WITHDRAW_TRIES = 3
WITHDRAW_PAUSE_S = 1.0


class DatabaseUnavailableError(RuntimeError):
    """The jobs could not be recorded: nothing was accepted."""


class BrokerUnavailableError(RuntimeError):
    """The jobs could not be put on the broker; they were withdrawn."""


class OutcomeUnknownError(RuntimeError):
    """The INSERT's answer was lost and neither Postgres nor Redis could be reached to take
    the job back: it may be recorded (and then runs). The client learns its id."""

    def __init__(self, job_id: uuid.UUID, idempotency_key: str | None) -> None:
        super().__init__(f"the outcome of job {job_id} is unknown")
        self.job_id = job_id
        self.idempotency_key = idempotency_key


class IdempotencyKeyTakenError(RuntimeError):
    """Another request recorded a job with this Idempotency-Key first."""


class JobRejectedError(ValueError):
    """PostgreSQL refused this job's own values (validation should have caught them): a
    422 for this request alone, its neighbours in the batch recorded without it."""


# A job whose Idempotency-Key another request recorded first is skipped, not the batch.
_INSERT = (
    f"INSERT INTO jobs ({column_list(INSERTED)}) VALUES %s ON CONFLICT DO NOTHING RETURNING id"
).encode()
_ROW = placeholders(INSERTED)
_WITHDRAW = Statement(
    "inferq_withdraw",
    ("uuid[]",),
    "DELETE FROM jobs WHERE id = ANY($1) AND status = 'queued' RETURNING id",
    prepare=False,
)
_PRESENT = Statement(
    "inferq_present", ("uuid[]",), "SELECT id, status FROM jobs WHERE id = ANY($1)", prepare=False
)

_Waiting = tuple[JobRow, "asyncio.Future[None]"]


class GroupCommitter:
    """One per API process, used from its event loop."""

    def __init__(self) -> None:
        self._pending: list[_Waiting] = []
        self._idle: list[AsyncConnection] = []
        self._busy = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Celery's producer is synchronous: it publishes from one thread of its own.
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="inferq-publish")

    async def submit(self, job: JobRow) -> None:
        """Resolves once the job is committed and announced; raises the 503 errors."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, done))
        self._schedule()
        await done

    def _schedule(self) -> None:
        # At the end of this loop turn, so requests parsed in the same turn share a batch.
        if not self._scheduled and self._pending and self._busy < CONNECTIONS:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        while self._pending and self._busy < CONNECTIONS:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._busy += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            outcomes = await self._record([job for job, _ in batch])
        except Exception as exc:
            outcomes = {job.id: exc for job, _ in batch}
        finally:
            self._busy -= 1
            self._schedule()
        for job, done in batch:
            if done.done():  # the request went away; the job stays recorded
                continue
            error = outcomes.get(job.id)
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    async def _connection(self) -> AsyncConnection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        try:
            return await AsyncConnection.connect(
                libpq_dsn(),
                timeout=DB_TIMEOUT_S,
                connect_timeout=3,
                application_name="inferq-api",
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )
        except (psycopg2.Error, OSError, TimeoutError) as exc:
            raise DatabaseUnavailableError(f"cannot connect: {exc}") from exc

    async def _record(self, jobs: list[JobRow]) -> dict[uuid.UUID, Exception]:
        """Insert and announce; returns the jobs that were not accepted, with why."""
        conn = await self._connection()
        try:
            rows = b",".join(conn.mogrify(_ROW, db_values(j, INSERTED)) for j in jobs)
            returned = await conn.fetchall(_INSERT.replace(b"%s", rows, 1))
        except (psycopg2.DataError, ValueError) as exc:
            # The values, not the server (a value jsonb refuses; psycopg2 refuses a NUL in
            # text itself): nothing was written. Find the job to blame by recording each
            # alone, so one bad job never fails its neighbours.
            if not conn.closed:
                self._idle.append(conn)
            if len(jobs) == 1:
                log.error("job refused by the database: %r", exc, extra={"job_id": str(jobs[0].id)})
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                return {jobs[0].id: JobRejectedError(f"the job could not be recorded: {first}")}
            outcomes: dict[uuid.UUID, Exception] = {}
            for job in jobs:
                try:
                    outcomes.update(await self._record([job]))
                except Exception as failure:
                    outcomes[job.id] = failure
            return outcomes
        except psycopg2.errors.QueryCanceled as exc:
            # The server gave up on the INSERT (statement_timeout): nothing was written.
            log.error("could not record %d jobs: %r", len(jobs), exc)
            if not conn.closed:
                self._idle.append(conn)
            raise DatabaseUnavailableError(str(exc) or type(exc).__name__) from exc
        except (psycopg2.Error, OSError, TimeoutError) as exc:
            log.error("could not record %d jobs: %r", len(jobs), exc)
            # The INSERT may have committed before its answer was lost.
            return await self._take_back(jobs, DatabaseUnavailableError(str(exc) or "lost"))
        recorded = {str(r[0]) for r in returned}  # uuid columns come back as text
        keys = {j.id: str(j.id) for j in jobs}
        accepted = [j for j in jobs if keys[j.id] in recorded]
        outcomes = {
            j.id: IdempotencyKeyTakenError(j.idempotency_key)
            for j in jobs
            if keys[j.id] not in recorded
        }
        try:
            await self._announce(accepted)
        except Exception as exc:
            log.error("broker unavailable, withdrawing %d jobs: %r", len(accepted), exc)
            # Withdrawn jobs are refused (503). A job that cannot be withdrawn (a worker took
            # it, or Postgres is gone too) is still recorded, so still accepted (202): the
            # sweeper sends it if need be.
            withdrawn = await self._withdraw(conn, accepted)
            error = BrokerUnavailableError(str(exc) or type(exc).__name__)
            outcomes.update({j.id: error for j in accepted if j.id in withdrawn})
            accepted = [j for j in accepted if j.id not in withdrawn]
        if not conn.closed:
            self._idle.append(conn)
        for j in accepted:
            waiter.accepted(keys[j.id], j.tenant)
        return outcomes

    @staticmethod
    @functools.cache
    def _announce_script() -> AsyncScript:
        return redis_async().register_script(ANNOUNCE)

    async def _announce(self, jobs: list[JobRow]) -> None:
        """Hot copies (SET NX: a worker that already wrote the terminal copy wins) and the
        doorbell in one script call (``ANNOUNCE``); a Celery message only where one is
        needed."""
        if not jobs:
            return
        settings = get_settings()
        predict = [j for j in jobs if j.type == JobType.PREDICT]
        hot = [(settings.key("job", j.id), hot_copy(j)) for j in jobs]
        keys, args = announce_args(
            hot, settings.result_ttl_s, [(j.id, j.priority) for j in predict]
        )
        rang = bool(await self._announce_script()(keys=keys, args=args))
        send = [(j.id, j.type, j.priority) for j in jobs if j.type != JobType.PREDICT]
        if rang:
            send += [(j.id, j.type, j.priority) for j in predict]
        if not send:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._publisher, enqueue, send)
        except Exception:
            if rang:  # nobody will take the doorbell down: do it here
                with contextlib.suppress(Exception):
                    await redis_async().delete(bell_key())
            raise

    async def _take_back(
        self, jobs: list[JobRow], error: DatabaseUnavailableError
    ) -> dict[uuid.UUID, Exception]:
        """After a lost INSERT answer: each job refused with ``error`` once it is certainly
        not going to run, accepted if a worker already took it, else outcome unknown.

        The withdrawal mark goes to Redis first: the INSERT may still be in flight (a frozen
        server holds it, to commit when it thaws, after the withdrawal found nothing), and
        the mark makes the sweeper delete such a late job instead of sending it."""
        ids = [str(j.id) for j in jobs]
        marked = await self._mark(jobs)
        taken: set[uuid.UUID] = set()
        left = ids
        for attempt in range(WITHDRAW_TRIES):
            if attempt:
                await asyncio.sleep(WITHDRAW_PAUSE_S)
            try:
                conn = await self._connection()
                await conn.run(_WITHDRAW, left)
                present = {uuid.UUID(str(i)): st for i, st in await conn.run(_PRESENT, left)}
            except Exception as exc:
                log.warning("withdrawal after a lost answer failed (try %d): %r", attempt + 1, exc)
                continue
            if not conn.closed:
                self._idle.append(conn)
            # Recorded, and a worker has them: accepted after all. Still queued: the INSERT
            # committed after the DELETE looked (its answer was lost before the commit),
            # so it is deleted on the next try.
            taken |= {i for i, st in present.items() if st != "queued"}
            left = [str(i) for i, st in present.items() if st == "queued"]
            if not left:
                break
        if taken:  # unmarked: they run
            with contextlib.suppress(Exception):
                await redis_async().delete(*(withdrawn_key(i) for i in taken))
            for j in jobs:
                if j.id in taken:
                    waiter.accepted(str(j.id), j.tenant)
        if not left:
            return {j.id: error for j in jobs if j.id not in taken}
        if not marked:
            return {
                j.id: OutcomeUnknownError(j.id, j.idempotency_key)
                for j in jobs
                if j.id not in taken
            }
        log.warning("marked %d jobs withdrawn until Postgres answers", len(jobs) - len(taken))
        return {j.id: error for j in jobs if j.id not in taken}

    async def _mark(self, jobs: list[JobRow]) -> bool:
        """Withdrawal marks for ``jobs`` in Redis; False if Redis could not take them."""
        try:
            pipe = redis_async().pipeline(transaction=False)
            for j in jobs:
                pipe.set(withdrawn_key(j.id), "1", ex=WITHDRAWN_TTL_S)
            await pipe.execute()
        except Exception as exc:
            log.error("could not mark %d jobs withdrawn: %r", len(jobs), exc)
            return False
        return True

    async def _withdraw(self, conn: AsyncConnection | None, jobs: list[JobRow]) -> set[uuid.UUID]:
        """Delete the jobs that are still queued; returns the ids deleted (a job a worker
        took meanwhile stays). ``conn`` None: on a connection of its own."""
        own = conn is None or conn.closed
        try:
            if conn is None or conn.closed:  # (``own``, spelt out for the type checker)
                conn = await self._connection()
            rows = await conn.run(_WITHDRAW, [str(j.id) for j in jobs])
        except Exception:
            log.exception("could not withdraw %d jobs; the sweeper will send any left", len(jobs))
            return set()
        if own and not conn.closed:
            self._idle.append(conn)
        return {uuid.UUID(str(r[0])) for r in rows}


submitter = GroupCommitter()
