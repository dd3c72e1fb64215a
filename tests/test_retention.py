"""Retention: old jobs, score runs and prediction logs go; a run's rows go whole."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text

from shared.db import session_scope
from shared.scoring.partitions import partition_name
from tests.conftest import ROW, Stack, make_client, submit, wait_done

OLD = timedelta(days=45)


@pytest.fixture
def owner(stack: Stack):  # type: ignore[no-untyped-def]
    with make_client(stack, tenant="default") as c:
        yield c


def _scalar(sql: str, **params: object) -> object:
    with session_scope() as session:
        return session.execute(text(sql), params).scalar()


def _age(job_ids: list[str], by: timedelta = OLD) -> None:
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE jobs SET created_at = created_at - :d, finished_at = finished_at - :d "
                "WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"d": by, "ids": job_ids},
        )


def _score(client: httpx.Client) -> str:
    r = submit(client, type="score", segment={"id": list(range(1, 200))})
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"], timeout=60)
    assert job["status"] == "succeeded", job
    return job["id"]


def test_an_old_score_run_is_dropped_whole_and_the_latest_kept(owner: httpx.Client) -> None:
    from workers.tasks.retention import prune_scoring_runs

    old, latest = _score(owner), _score(owner)
    for run in (old, latest):  # each run's rows are a table of their own
        assert _scalar("SELECT to_regclass(:n) IS NOT NULL", n=partition_name(uuid.UUID(run)))
        assert _scalar("SELECT count(*) FROM predictions WHERE run_id = :r", r=run) == 199
    _age([old, latest])
    assert prune_scoring_runs() >= 1
    assert _scalar("SELECT to_regclass(:n)", n=partition_name(uuid.UUID(old))) is None
    assert _scalar("SELECT count(*) FROM predictions WHERE run_id = :r", r=old) == 0
    for table in ("jobs", "scoring_runs"):
        assert _scalar(f"SELECT count(*) FROM {table} WHERE id = :r", r=old) == 0
    assert _scalar("SELECT count(*) FROM scoring_chunks WHERE run_id = :r", r=old) == 0
    # The latest run of the model holds its current scores: kept however old.
    assert _scalar("SELECT count(*) FROM predictions WHERE run_id = :r", r=latest) == 199
    prune_scoring_runs()
    assert _scalar("SELECT count(*) FROM scoring_runs WHERE id = :r", r=latest) == 1


def test_a_run_interrupted_mid_detach_is_finished_next_time(owner: httpx.Client) -> None:
    from shared.db import autocommit
    from shared.scoring.partitions import drop_partition

    run = uuid.UUID(_score(owner))
    name = partition_name(run)
    with autocommit() as conn:  # what an interrupted DETACH ... CONCURRENTLY leaves
        conn.exec_driver_sql(f'ALTER TABLE predictions DETACH PARTITION "{name}"')
    assert drop_partition(run) is True
    assert _scalar("SELECT to_regclass(:n)", n=name) is None
    assert drop_partition(run) is False  # nothing left: a repeat is harmless


def test_old_jobs_and_logs_are_deleted_recent_ones_kept(stack: Stack) -> None:
    from workers.tasks.retention import prune_jobs, prune_prediction_logs

    with make_client(stack) as c:
        ids = []
        for _ in range(3):
            r = submit(c, inputs=[ROW, ROW])
            assert r.status_code == 202, r.text
            ids.append(wait_done(c, r.json()["id"])["id"])
        old, recent = ids[:2], ids[2:]
        _age(old)
        with session_scope() as session:
            session.execute(
                text(
                    "UPDATE prediction_logs SET created_at = created_at - :d "
                    "WHERE job_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"d": OLD, "ids": old},
            )
            session.execute(  # an outbox row goes with its job
                text(
                    "INSERT INTO callback_deliveries (job_id, url, next_at, delivered_at) "
                    "VALUES (:j, 'https://example.com/', now(), now())"
                ),
                {"j": old[0]},
            )
        assert prune_jobs() >= 2
        assert prune_prediction_logs() >= 4
        for job in old:
            assert _scalar("SELECT count(*) FROM jobs WHERE id = :j", j=job) == 0
            assert _scalar("SELECT count(*) FROM prediction_logs WHERE job_id = :j", j=job) == 0
        assert _scalar("SELECT count(*) FROM callback_deliveries WHERE job_id = :j", j=old[0]) == 0
        assert _scalar("SELECT status FROM jobs WHERE id = :j", j=recent[0]) == "succeeded"
        assert _scalar("SELECT count(*) FROM prediction_logs WHERE job_id = :j", j=recent[0]) == 2
