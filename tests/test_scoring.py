"""Population scoring through real workers: exactly one prediction per customer."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import date
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from shared.db import session_scope
from tests.conftest import CUSTOMERS, Stack, make_client, submit, wait_done, wait_for


@pytest.fixture
def client(stack: Stack):  # type: ignore[no-untyped-def]
    """These tests score the demo customers, so they run as their tenant, ``default``."""
    with make_client(stack, tenant="default") as c:
        yield c


def _counts(run_id: str) -> tuple[int, int]:
    with session_scope() as session:
        total, distinct = session.execute(
            text("SELECT count(*), count(DISTINCT entity_id) FROM predictions WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    return int(total), int(distinct)


def _segment_count(where: str) -> int:
    with session_scope() as session:
        return int(session.execute(text(f"SELECT count(*) FROM customers WHERE {where}")).scalar())


def test_score_a_segment_writes_one_prediction_per_customer(client: httpx.Client) -> None:
    segment = {"plan_tier": "enterprise", "contract_type": ["monthly", "annual"]}
    r = submit(client, type="score", segment=segment)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    expected = _segment_count("plan_tier = 'enterprise' AND contract_type IN ('monthly', 'annual')")
    assert 1000 < expected < CUSTOMERS
    result = job["result"]
    assert result["rows_scored"] == expected
    assert _counts(result["run_id"]) == (expected, expected)
    assert job["progress"] == {"done": expected, "total": expected}
    assert sum(result["histogram"]["counts"]) == expected
    assert result["duration_s"] > 0
    with session_scope() as session:
        run = session.execute(
            text("SELECT status, rows_scored, rows_total, version FROM scoring_runs WHERE id = :r"),
            {"r": result["run_id"]},
        ).one()
        wrong = session.execute(
            text(
                "SELECT count(*) FROM predictions p JOIN customers c ON c.id = p.entity_id "
                "WHERE p.run_id = :r AND (c.plan_tier <> 'enterprise' OR c.contract_type = "
                "'multi-year')"
            ),
            {"r": result["run_id"]},
        ).scalar()
    assert tuple(run) == ("succeeded", expected, expected, job["model_version"])
    assert wrong == 0


def test_scores_match_the_online_prediction(client: httpx.Client) -> None:
    ids = [11, 12, 13]
    job = wait_done(client, submit(client, type="score", segment={"id": ids}).json()["id"])
    assert job["result"]["rows_scored"] == 3
    online = wait_done(client, submit(client, entity_ids=ids).json()["id"])
    r = client.get(f"/v1/jobs/{job['id']}/result.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["entity_id"]) for row in rows] == ids
    np.testing.assert_allclose(
        [float(row["score"]) for row in rows],
        [p["score"] for p in online["result"]["predictions"]],
        rtol=0,
        atol=1e-12,
    )
    assert [row["label"] for row in rows] == [
        str(p["label"]).lower() for p in online["result"]["predictions"]
    ]


def test_result_csv_of_a_whole_segment_streams_every_row(client: httpx.Client) -> None:
    job = wait_done(
        client,
        submit(client, type="score", segment={"num_integrations": 7}).json()["id"],
        timeout=120,
    )
    with client.stream("GET", f"/v1/jobs/{job['id']}/result.csv") as r:
        lines = sum(chunk.count("\n") for chunk in r.iter_text())
    assert lines == job["result"]["rows_scored"] + 1


@pytest.mark.parametrize(
    ("segment", "loc"),
    [
        ({"churned": True}, ("body", "segment", "churned")),
        ({"plan_tier": "platinum"}, ("body", "segment", "plan_tier")),
        ({"plan_tier": ["growth", "gold"]}, ("body", "segment", "plan_tier", 1)),
        ({"tenure_months": "12; DROP TABLE customers"}, ("body", "segment", "tenure_months")),
        ({"tenure_months": {"gt": 3}}, ("body", "segment", "tenure_months")),
        ({"plan_tier": []}, ("body", "segment", "plan_tier")),
        ({"1=1 OR id": 1}, ("body", "segment", "1=1 OR id")),
    ],
)
def test_bad_segments_are_422(client: httpx.Client, segment: dict, loc: tuple) -> None:
    r = submit(client, type="score", segment=segment)
    assert r.status_code == 422, r.text
    assert loc in {tuple(e["loc"]) for e in r.json()["detail"]}


def test_score_rejects_other_fields_and_models_without_a_table(client: httpx.Client) -> None:
    r = submit(client, type="score", inputs=[{}])
    assert ["body", "inputs"] in [e["loc"] for e in r.json()["detail"]]
    r = submit(client, type="score", model="demand")
    assert ["body", "model"] in [e["loc"] for e in r.json()["detail"]]


def test_result_csv_errors(client: httpx.Client) -> None:
    predict = submit(client, entity_ids=[1]).json()["id"]
    assert client.get(f"/v1/jobs/{predict}/result.csv").status_code == 404
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/result.csv").status_code == 404


def test_progress_moves_while_a_run_is_scored(stack: Stack, client: httpx.Client) -> None:
    job_id = submit(client, type="score").json()["id"]
    seen = set()
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["progress"]:
            seen.add(job["progress"]["done"])
            assert job["progress"]["total"] == CUSTOMERS
        if job["status"] not in ("queued", "running"):
            break
    assert job["status"] == "succeeded"
    assert len(seen) >= 2 and max(seen) == CUSTOMERS  # it moved, and it ended at the total
    assert _counts(job["result"]["run_id"]) == (CUSTOMERS, CUSTOMERS)


def test_worker_killed_mid_run_still_one_row_per_customer(
    stack: Stack, client: httpx.Client
) -> None:
    job_id = submit(client, type="score").json()["id"]

    def chunk_in_flight() -> bool:
        """Some chunks done and one taken but not done."""
        with session_scope() as session:
            done, running = session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE done_at IS NOT NULL), "
                    "count(*) FILTER (WHERE attempts >= 1 AND done_at IS NULL) "
                    "FROM scoring_chunks WHERE run_id = :r"
                ),
                {"r": job_id},
            ).one()
        return bool(done and running)

    def frozen_mid_chunk() -> list[int] | None:
        """Both pool processes stopped while a chunk is in flight (stopped first, so the
        chunk cannot finish between the look and the kill)."""
        pids = stack.worker_children()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        if chunk_in_flight():
            return pids
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        return None

    victims = wait_for(frozen_mid_chunk, 60, "a chunk in flight after the first one", step=0.002)
    for pid in victims:  # both pool processes, whatever they hold
        os.kill(pid, signal.SIGKILL)
    job = wait_done(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert _counts(job["result"]["run_id"]) == (CUSTOMERS, CUSTOMERS)
    assert job["result"]["rows_scored"] == CUSTOMERS
    assert not set(victims) & set(stack.worker_children())
    with session_scope() as session:
        redelivered = session.execute(
            text("SELECT count(*) FROM scoring_chunks WHERE run_id = :r AND attempts > 1"),
            {"r": job_id},
        ).scalar()
    assert redelivered >= 1  # chunks in flight when the workers died ran again


def test_a_chunk_delivered_twice_writes_once(stack: Stack, client: httpx.Client) -> None:
    from workers.tasks.score import dispatch_chunks

    job = wait_done(client, submit(client, type="score", segment={"id": [1, 2, 3]}).json()["id"])
    run_id = job["result"]["run_id"]
    dispatch_chunks(uuid.UUID(run_id), [0, 0])  # redelivery, twice
    import time

    time.sleep(1.5)
    assert _counts(run_id) == (3, 3)
    assert client.get(f"/v1/jobs/{job['id']}").json()["result"]["rows_scored"] == 3


def test_nightly_run_is_a_job_and_happens_once_per_night(stack: Stack, admin: httpx.Client) -> None:
    from workers.app import celery_app
    from workers.beat import schedule
    from workers.tasks.maintenance import nightly_score, schedule_nightly_run

    entry = schedule(__import__("shared.config").config.get_settings())["nightly-scoring"]
    assert entry["task"] == "ops.nightly_score" and "kwargs" not in entry  # every model
    assert str(entry["schedule"].hour) == "{2}" and str(entry["schedule"].minute) == "{0}"
    assert "ops.nightly_score" in celery_app.tasks

    night = date(2001, 1, 1)
    first = schedule_nightly_run("churn", night)
    assert first is not None
    assert schedule_nightly_run("churn", night) is None  # a second beat, same night
    job = wait_done(admin, str(first), timeout=120)
    assert job["status"] == "succeeded" and job["type"] == "score"
    assert job["metadata"] == {"scheduled": "nightly", "night": "2001-01-01"}
    assert job["result"]["rows_scored"] == CUSTOMERS
    listed = [j["id"] for j in admin.get("/v1/jobs", params={"type": "score"}).json()["items"]]
    assert str(first) in listed
    # The task itself, called as beat calls it, records tonight's run of every model with
    # a feature table.
    tonight = nightly_score.apply().get()
    assert tonight
    runs = [wait_done(admin, j, timeout=120) for j in tonight]
    assert all(r["status"] == "succeeded" for r in runs)
    assert "churn" in {r["model"] for r in runs}
    assert nightly_score.apply().get() == []
    assert nightly_score.apply(kwargs={"model": "churn"}).get() is None


def test_latest_score_is_one_indexed_query(stack: Stack) -> None:
    from shared.scoring.plan import latest_score

    with session_scope() as session:
        latest = latest_score(session, 12)
        plan = "\n".join(
            r[0]
            for r in session.execute(
                text(
                    "EXPLAIN SELECT * FROM predictions WHERE entity_id = 12 "
                    "ORDER BY scored_at DESC LIMIT 1"
                )
            )
        )
    assert latest is not None and 0 <= latest["score"] <= 1
    # One index probe per run's partition (each inherits ix_predictions_entity_latest).
    assert "Index Scan" in plan and "Seq Scan" not in plan, plan


def test_a_chunks_table_holds_one_row_per_customer_of_its_range_scored_as_of_the_run(
    stack: Stack,
) -> None:
    """A chunk's table refuses a row scored at another time than the run's start or
    outside the chunk's ids, and a second row for a customer fails its index build (the
    chunk's transaction), never passes; a failed chunk leaves no table behind."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy.exc

    from shared.scoring.partitions import (
        chunk_index_statements,
        chunk_table_name,
        chunk_table_statements,
        create_partition,
        partition_name,
    )

    run_id, started = uuid.uuid4(), datetime.now(UTC)
    name, table = partition_name(run_id), chunk_table_name(run_id, 0)
    ddl = chunk_table_statements(run_id, 0, 1, 10, started_at=started, model="churn", version=1)
    insert = text(f'INSERT INTO "{table}" (entity_id, score, scored_at) VALUES (:e, 0.5, :t)')

    def chunk(session: Any, *rows: dict[str, Any]) -> None:
        for statement in ddl:
            session.execute(text(statement))
        for row in rows:
            session.execute(insert, row)
        for statement in chunk_index_statements(run_id, 0):
            session.execute(text(statement))

    try:
        with session_scope() as session:
            create_partition(session.connection(), run_id)
        refused = pytest.raises(sqlalchemy.exc.IntegrityError, match="check constraint")
        with refused, session_scope() as session:
            chunk(session, {"e": 1, "t": started + timedelta(seconds=1)})
        with refused, session_scope() as session:
            chunk(session, {"e": 11, "t": started})  # the next chunk's id
        twice = pytest.raises(sqlalchemy.exc.IntegrityError, match="could not create unique index")
        with twice, session_scope() as session:
            chunk(session, {"e": 1, "t": started}, {"e": 1, "t": started})
        with session_scope() as session:
            left = session.execute(text("SELECT to_regclass(:n)"), {"n": table}).scalar()
            attached = session.execute(
                text("SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass(:n)"),
                {"n": name},
            ).scalar()
        assert left is None and attached == 0
        with session_scope() as session:  # the run's defaults fill in what a row leaves out
            chunk(session, {"e": 1, "t": started})
            got = session.execute(text(f'SELECT run_id, model, version FROM "{table}"')).one()
        assert tuple(got) == (run_id, "churn", 1)
    finally:
        with session_scope() as session:
            session.execute(text(f'DROP TABLE IF EXISTS "{name}", "{table}"'))


def test_a_run_planned_with_one_plain_table_still_closes(stack: Stack) -> None:
    """A run whose partition is one plain table (planned before chunk tables) gets its
    index built and is attached at its close, as before."""
    from datetime import UTC, datetime

    from shared.scoring.partitions import attach_partition, partition_name

    run_id, started = uuid.uuid4(), datetime.now(UTC)
    name = partition_name(run_id)
    try:
        with session_scope() as session:
            session.execute(text(f'CREATE TABLE "{name}" (LIKE predictions INCLUDING DEFAULTS)'))
            session.execute(
                text(
                    f'INSERT INTO "{name}" (run_id, entity_id, model, version, score, scored_at) '
                    "VALUES (:r, 1, 'churn', 1, 0.5, :t), (:r, 2, 'churn', 1, 0.25, :t)"
                ),
                {"r": run_id, "t": started},
            )
        with session_scope() as session:
            attach_partition(session.connection(), run_id)
        with session_scope() as session:
            rows = session.execute(
                text("SELECT entity_id FROM predictions WHERE run_id = :r ORDER BY 1"),
                {"r": run_id},
            ).scalars()
            pk = session.execute(
                text(
                    "SELECT count(*) FROM pg_constraint WHERE conrelid = to_regclass(:n) "
                    "AND contype = 'p'"
                ),
                {"n": name},
            ).scalar()
            assert list(rows) == [1, 2] and pk == 1
    finally:
        with session_scope() as session:
            session.execute(text(f'DROP TABLE IF EXISTS "{name}"'))


def _cli_submit(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.conftest import ROOT

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.devstack.cli",
            "submit",
            "churn",
            *args,
            "--url",
            stack.api_url,
        ],
        cwd=ROOT,
        env={**os.environ, "INFERQ_API_KEY": os.environ["INFERQ_BOOTSTRAP_API_KEY"]},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_submit_score_reads_as_text_with_a_bar_that_moves(stack: Stack) -> None:
    """For a person: a summary, not JSON; a progress bar that passes through the chunks
    at a believable rate; no log lines mixed in."""
    out = _cli_submit(stack, "--score")
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    assert re.match(r"job \S+ succeeded in [\d.]+ s \(score, churn v\d+\)$", first), first
    assert f"rows_scored: {CUSTOMERS}" in rest
    assert not any(line.lstrip().startswith("{") for line in out.stdout.splitlines())
    assert '"level"' not in out.stderr and "Traceback" not in out.stderr
    seen = {int(n) for n in re.findall(rf"(\d+)/{CUSTOMERS}", out.stderr)}
    assert CUSTOMERS in seen and any(0 < n < CUSTOMERS for n in seen), out.stderr
    rates = [float(r) for r in re.findall(r"([\d.]+)rows/s", out.stderr)]
    assert rates and max(rates) < 50 * CUSTOMERS, rates  # a rate, not a jump over a chunk


def test_cli_submit_json_is_the_job(stack: Stack) -> None:
    out = _cli_submit(stack, "--score", "--segment", '{"plan_tier": "growth"}', "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded"
    assert job["result"]["rows_scored"] == _segment_count("plan_tier = 'growth'")
    assert "rows/s" not in out.stderr  # no bar either


def test_a_nightly_run_whose_trigger_was_lost_is_caught_up_once(
    stack: Stack, admin: httpx.Client
) -> None:
    from datetime import UTC, datetime

    from tests.conftest import start_process
    from workers.beat import last_fire
    from workers.tasks.maintenance import catch_up_nightly

    night = datetime(2003, 3, 3, 10, 0, tzinfo=UTC)  # beat was down at 02:00
    assert last_fire("0 2 * * *", night) == datetime(2003, 3, 3, 2, 0, tzinfo=UTC)
    assert last_fire("0 2 * * *", night.replace(hour=1)) == datetime(2003, 3, 2, 2, 0, tzinfo=UTC)
    assert last_fire("30 4 * * 1", night) == datetime(2003, 3, 3, 4, 30, tzinfo=UTC)  # a Monday
    caught = catch_up_nightly(night)
    assert caught
    runs = [wait_done(admin, str(j), timeout=120) for j in caught]
    assert {r["metadata"]["night"] for r in runs} == {"2003-03-03"}
    assert "churn" in {r["model"] for r in runs} and all(r["status"] == "succeeded" for r in runs)
    assert catch_up_nightly(night) == []  # it exists now
    # Every beat start asks for the catch-up.
    beat = start_process("beat", "beat", env={"INFERQ_NIGHTLY_CATCH_UP": "true"})
    try:
        wait_for(
            lambda: "ops.nightly_catch_up" in stack.worker.log.read_text(errors="replace"),
            30,
            "a worker to receive the catch-up a starting beat sends",
            step=0.5,
        )
    finally:
        beat.stop()


def test_a_run_whose_chunk_messages_were_lost_is_sent_again_and_ends(
    stack: Stack, client: httpx.Client
) -> None:
    """The plan committed, the chunk messages never reached the broker (it restarted
    empty, or the dispatch failed): once the run has not moved for INFERQ_SCORE_STALL_S
    the sweeper sends its undone chunks again, and the run ends with one row per entity."""
    from datetime import UTC, datetime, timedelta

    from shared.orm import Job
    from shared.scoring.plan import plan
    from workers.tasks.maintenance import redispatch_stalled_runs

    job_id = uuid.uuid4()
    segment = {"id": list(range(1, 301))}
    with session_scope() as session:
        job = Job(
            id=job_id,
            tenant="default",
            type="score",
            model="churn",
            model_version=1,
            status="running",
            priority="normal",
            request={"segment": segment},
            attempts=1,
            worker="gone-host:9/lost-task",
            started_at=datetime.now(UTC) - timedelta(minutes=5),
            heartbeat_at=datetime.now(UTC) - timedelta(minutes=5),
        )
        session.add(job)
        session.flush()
        assert plan(session, job, chunk_rows=100)  # planned, and no message sent
    assert redispatch_stalled_runs() >= 1
    done = wait_done(client, str(job_id), timeout=60)
    assert done["status"] == "succeeded", done
    assert _counts(str(job_id)) == (300, 300)


def test_a_stalled_run_with_every_chunk_done_is_closed(stack: Stack, client: httpx.Client) -> None:
    """The last chunk's task was killed between its commit and the close: nothing is left
    to send, so the sweeper closes the run itself."""
    from datetime import UTC, datetime, timedelta

    from shared.orm import Job
    from shared.scoring.plan import plan
    from workers.tasks.maintenance import redispatch_stalled_runs

    job_id = uuid.uuid4()
    old = datetime.now(UTC) - timedelta(minutes=5)
    with session_scope() as session:
        job = Job(
            id=job_id,
            tenant="default",
            type="score",
            model="churn",
            model_version=1,
            status="running",
            priority="normal",
            request={"segment": {"id": [1, 2, 3]}},
            attempts=1,
            started_at=old,
            heartbeat_at=old,
        )
        session.add(job)
        session.flush()
        plan(session, job, chunk_rows=100)
        session.execute(  # every chunk written, as by tasks that died before closing
            text("UPDATE scoring_chunks SET done_at = now(), rows = 0 WHERE run_id = :r"),
            {"r": str(job_id)},
        )
    assert redispatch_stalled_runs() == 0  # nothing to send...
    done = client.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done  # ...but the run is closed
