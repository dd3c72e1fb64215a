"""The 202 promise under failure: SIGKILLed workers, lost messages, promotions mid-flight."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import update

from shared.db import session_scope
from shared.orm import Job
from tests.conftest import ROW, Stack, record_queued, start_process, submit, wait_done, wait_for


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def _abandon(job_id: str, *, attempts: int) -> None:
    """Make the job look held by a worker that died an hour ago."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(
                status="running",
                attempts=attempts,
                worker="dead-host:1/lost-task",
                started_at=an_hour_ago,
                heartbeat_at=an_hour_ago,
            )
        )


def test_worker_killed_mid_job_the_job_still_succeeds(stack: Stack, admin: httpx.Client) -> None:
    job_id = submit(admin, type="train", promote="never").json()["id"]
    running = wait_for(
        lambda: (j := _job(job_id)).status == "running" and j, 30, "the job to start", step=0.01
    )
    pid = int(running.worker.split("/")[0].rsplit(":", 1)[1])
    assert pid in stack.worker_children()
    os.kill(pid, signal.SIGKILL)  # the prefork child running the job dies mid-fit

    job = wait_done(admin, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["result"]["version"] >= 2
    assert pid not in stack.worker_children()  # the pool replaced the dead child
    assert len(stack.worker_children()) == 2


def test_attempts_are_capped(stack: Stack, client: httpx.Client) -> None:
    """A job whose deliveries keep dying fails for good with a clear error."""

    job_id = record_queued(client)
    _abandon(job_id, attempts=3)  # as if three workers had died holding it
    from workers.tasks.maintenance import sweep_once

    assert sweep_once() >= 1
    job = wait_done(client, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "too_many_attempts"
    assert "3 attempts" in job["error"]["message"]


def test_beat_resends_a_job_that_never_reached_the_broker(
    stack: Stack, client: httpx.Client
) -> None:
    """Crash between commit and publish: the row exists, no message does. Beat's sweeper
    (a real beat process) sends it, and the worker runs it."""

    job_id = record_queued(client)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(created_at=datetime.now(UTC) - timedelta(minutes=5))
        )
    beat = start_process("beat", "beat", env={"INFERQ_SWEEP_EVERY_S": "1"})
    try:
        job = wait_done(client, job_id, timeout=30)
    finally:
        beat.stop()
    assert job["status"] == "succeeded", beat.tail()
    assert job["result"]["predictions"][0]["score"] > 0


def test_a_running_job_whose_lease_expired_is_run_again(stack: Stack, client: httpx.Client) -> None:
    """The whole worker (not just a child) died: its message waits for the visibility
    timeout, but the sweeper sees the stale heartbeat and re-sends the job at once."""
    from workers.tasks.maintenance import sweep_once

    job_id = record_queued(client)
    _abandon(job_id, attempts=1)
    assert sweep_once() >= 1
    job = wait_done(client, job_id)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2


def test_a_duplicate_message_for_a_running_job_does_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    from shared.broker import enqueue

    job_id = record_queued(client)
    alive = datetime.now(UTC)
    with session_scope() as session:  # another delivery holds it and is alive
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status="running", attempts=1, worker="other:1/other-task", heartbeat_at=alive)
        )
    enqueue([(uuid.UUID(job_id), "predict", "normal")])
    time.sleep(1.5)
    job = _job(job_id)
    assert job.status == "running" and job.attempts == 1 and job.worker == "other:1/other-task"


def test_promotion_is_picked_up_by_the_running_worker(stack: Stack, admin: httpx.Client) -> None:
    from shared.models.encoding import encode_rows
    from shared.models.registry import ModelCache
    from shared.models.training import train

    before = admin.get("/v1/models/churn").json()["production_version"]
    with session_scope() as session:  # a visibly different model: fewer rows
        new = train(session, "churn", promote="never", max_rows=3000)["version"]
        expected = ModelCache().get(session, "churn", new)
    score = float(expected.predict(encode_rows([ROW], expected.schema))[0][0])
    try:
        r = admin.post(f"/v1/models/churn/versions/{new}/promote")
        assert r.status_code == 200 and r.json()["production_version"] == new
        promoted_at = time.monotonic()

        def on_new_version() -> dict | None:
            job = wait_done(admin, submit(admin, inputs=[ROW]).json()["id"])
            return job if job["model_version"] == new else None

        job = wait_for(on_new_version, 10, "jobs to run on the promoted version", step=0.2)
        assert time.monotonic() - promoted_at < 10
        assert job["result"]["predictions"][0]["score"] == score

        # Without a restart, the worker preloaded the version within its poll interval.
        def preloaded() -> bool:
            for line in stack.worker.log.read_text().splitlines():
                if (
                    line.startswith("{")
                    and "preloaded" in line
                    and f"('churn', {new})" in json.loads(line)["message"]
                ):
                    return True
            return False

        wait_for(preloaded, 10, "the worker to preload the new version", step=0.2)
    finally:
        admin.post(f"/v1/models/churn/versions/{before}/promote")


def test_draining_workers_killed_under_load_lose_no_job_and_write_none_twice(
    stack: Stack, client: httpx.Client
) -> None:
    """Both prefork children are SIGKILLed while jobs stream in: every job still ends
    succeeded, with exactly one prediction-log row, without waiting for the sweeper.
    What the dead held comes back with its redelivered message: the jobs it had claimed
    and the ids it had popped but not yet claimed (its in-flight list)."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from shared.orm import PredictionLog

    rows = [{**ROW, "tenure_months": 1 + i % 120, "monthly_spend": float(i)} for i in range(1500)]
    killed: list[int] = []

    def kill_when_busy() -> None:
        wait_for(lambda: _succeeded(tenant) >= 200, 60, "jobs to flow", step=0.01)
        for pid in stack.worker_children():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    tenant = _tenant(client)
    with ThreadPoolExecutor(17) as pool:
        killer = pool.submit(kill_when_busy)
        ids = list(pool.map(lambda r: submit(client, inputs=[r]).json()["id"], rows))
        killer.result()
    assert len(killed) == 2

    wait_for(lambda: _succeeded(tenant) == len(ids), 30, "every job to end", step=0.2)
    with session_scope() as session:
        logged = session.execute(
            select(PredictionLog.job_id, func.count())
            .where(PredictionLog.job_id.in_([uuid.UUID(i) for i in ids]))
            .group_by(PredictionLog.job_id)
        ).all()
    assert len(logged) == len(ids) and {n for _, n in logged} == {1}
    assert not set(killed) & set(stack.worker_children())
    wait_for(lambda: len(stack.worker_children()) == 2, 30, "the pool to replace its children")


def _tenant(client: httpx.Client) -> str:
    from tests.conftest import tenant_of

    return tenant_of(client)


def _succeeded(tenant: str) -> int:
    from sqlalchemy import text

    with session_scope() as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM jobs WHERE tenant = :t AND status = 'succeeded'"),
                {"t": tenant},
            ).scalar_one()
        )


def test_predict_jobs_of_a_worker_that_vanished_are_retaken_in_seconds(
    stack: Stack, client: httpx.Client
) -> None:
    """A machine that dies takes its worker processes' heartbeat keys with it, and no one
    is left to redeliver their messages: the sweeper gives their running predict jobs back
    within a heartbeat period or three, not a lease (600 s) later."""
    from sqlalchemy import text

    from workers.process import heartbeat_key, redis_client
    from workers.tasks.maintenance import retake_orphans

    orphan, held = record_queued(client), record_queued(client)
    redis_client().set(heartbeat_key("live-host:2"), "1", ex=60)
    with session_scope() as session:
        for job_id, worker in ((orphan, "gone-host:1/task-a"), (held, "live-host:2/task-b")):
            session.execute(
                text(
                    "UPDATE jobs SET status = 'running', worker = :w, attempts = 1, "
                    "started_at = now() - interval '20 s', heartbeat_at = now() - interval '20 s' "
                    "WHERE id = :id"
                ),
                {"w": worker, "id": job_id},
            )
    try:
        retaken = {str(i) for i in retake_orphans()}
        assert orphan in retaken and held not in retaken
        job = wait_done(client, orphan, timeout=30)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        assert client.get(f"/v1/jobs/{held}").json()["status"] == "running"  # its worker lives
        assert held not in {str(i) for i in retake_orphans()}
    finally:
        with session_scope() as session:
            session.execute(
                text("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = :id"),
                {"id": held},
            )
        redis_client().delete(heartbeat_key("live-host:2"))


def test_predict_jobs_running_past_the_time_limit_are_retaken_though_their_process_lives(
    stack: Stack, client: httpx.Client
) -> None:
    """A task terminated when the broker connection was lost leaves its process alive
    (heartbeat and all) and its jobs running: past the predict hard time limit nobody can
    be running them, so they are retaken without waiting for the lease."""
    from sqlalchemy import text

    from shared.config import get_settings
    from workers.process import heartbeat_key, redis_client
    from workers.tasks.maintenance import retake_orphans

    limit = get_settings().predict_time_limit_s
    stuck, recent = record_queued(client), record_queued(client)
    redis_client().set(heartbeat_key("live-host:3"), "1", ex=60)
    with session_scope() as session:
        for job_id, age in ((stuck, limit + 10), (recent, 20)):
            session.execute(
                text(
                    "UPDATE jobs SET status = 'running', worker = 'live-host:3/task-c', "
                    "attempts = 1, started_at = now() - make_interval(secs => :age), "
                    "heartbeat_at = now() - make_interval(secs => :age) WHERE id = :id"
                ),
                {"age": age, "id": job_id},
            )
    try:
        retaken = {str(i) for i in retake_orphans()}
        assert stuck in retaken and recent not in retaken
        job = wait_done(client, stuck, timeout=30)
        assert job["status"] == "succeeded" and job["attempts"] == 2
    finally:
        with session_scope() as session:
            session.execute(
                text("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = :id"),
                {"id": recent},
            )
        redis_client().delete(heartbeat_key("live-host:3"))
