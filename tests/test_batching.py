"""Micro-batching: jobs queued together are predicted in one call per model version."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from redis import Redis
from sqlalchemy import select, update

from shared.config import get_settings
from shared.db import session_scope
from shared.models.encoding import encode_rows
from shared.models.registry import ModelCache
from shared.orm import Job, PredictionLog
from tests.conftest import ROW, Stack, record_queued, submit, wait_done
from workers.app import celery_app


def _rows(n: int) -> list[dict]:
    return [
        {
            **ROW,
            "tenure_months": 1 + i % 120,
            "monthly_spend": 10.0 + i,
            "plan_tier": ("starter", "growth", "enterprise")[i % 3],
        }
        for i in range(n)
    ]


def _local(version: int, rows: list[dict]) -> list[float]:
    """Each row's score predicted on its own, by the same artifact and runtime."""
    with session_scope() as session:
        model = ModelCache().get(session, "churn", version)
    return [float(model.predict(encode_rows([r], model.schema))[0][0]) for r in rows]


def _sklearn(version: int, rows: list[dict]) -> list[float]:
    """Each row's positive-class probability from scikit-learn itself, one row at a time."""
    with session_scope() as session:
        model = ModelCache().get(session, "churn", version)
    return [
        float(model.estimator.predict_proba(encode_rows([r], model.schema))[0, 1]) for r in rows
    ]


def _send_as_one_batch(job_ids: list[str]) -> None:
    celery_app.send_task("predict.run", args=[job_ids], queue="predict")


def test_concurrent_jobs_are_batched_and_match_one_at_a_time(stack: Stack, client) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(120)
    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(lambda r: submit(client, inputs=[r]).json()["id"], rows))
    jobs = [wait_done(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    batched = [j["result"]["predictions"][0]["score"] for j in jobs]
    assert batched == _local(1, rows)  # row for row, as if each job had been alone
    assert max(abs(a - b) for a, b in zip(batched, _sklearn(1, rows), strict=True)) < 1e-6
    with session_scope() as session:
        workers = session.scalars(select(Job.worker).where(Job.id.in_(ids))).all()
    per_message = {}
    for w in workers:
        per_message[w] = per_message.get(w, 0) + 1
    assert max(per_message.values()) > 1  # some messages carried several jobs
    assert len(per_message) < len(ids)


def test_versions_are_never_mixed_in_one_batch(stack: Stack, client: httpx.Client) -> None:
    from shared.models.training import train

    with session_scope() as session:
        v2 = train(session, "churn", promote="never", max_rows=2000)["version"]
    rows = _rows(6)
    ids = [
        record_queued(client, {"inputs": [r]}, version=1 if i % 2 else v2)
        for i, r in enumerate(rows)
    ]
    _send_as_one_batch(ids)
    jobs = [wait_done(client, i) for i in ids]
    for i, (job, row) in enumerate(zip(jobs, rows, strict=True)):
        version = 1 if i % 2 else v2
        assert job["status"] == "succeeded", job
        assert job["result"]["predictions"][0]["score"] == _local(version, [row])[0]
    with session_scope() as session:
        logged = dict(
            session.execute(
                select(PredictionLog.job_id, PredictionLog.version).where(
                    PredictionLog.job_id.in_([uuid.UUID(i) for i in ids])
                )
            ).all()
        )
    assert {str(k): v for k, v in logged.items()} == {
        i: (1 if n % 2 else v2) for n, i in enumerate(ids)
    }
    assert _local(1, rows[:1]) != _local(v2, rows[:1])  # the two versions really differ


def test_one_bad_job_does_not_fail_its_batch(stack: Stack, client: httpx.Client) -> None:
    """A record that slipped past validation (say, written by an older API) fails alone."""
    good = [record_queued(client, {"inputs": [r]}) for r in _rows(3)]
    bad = record_queued(client, {"inputs": [{**ROW, "plan_tier": "platinum"}]})
    _send_as_one_batch([good[0], bad, good[1], good[2]])
    assert wait_done(client, bad)["error"]["code"] == "prediction_failed"
    for i, job_id in enumerate(good):
        job = wait_done(client, job_id)
        assert job["status"] == "succeeded"
        assert job["result"]["predictions"][0]["score"] == _local(1, [_rows(3)[i]])[0]


def _cache_counts() -> tuple[float, float]:
    stats = Redis.from_url(get_settings().redis_url).hgetall(get_settings().key("stats"))
    hits = float(stats.get(b"cache|predictions|hit", 0))
    misses = float(stats.get(b"cache|predictions|miss", 0))
    return hits, misses


def test_cache_hit_returns_the_same_answer_and_promotion_invalidates(
    stack: Stack, client: httpx.Client, admin: httpx.Client
) -> None:
    from shared.models.training import train

    row = {**ROW, "monthly_spend": 12345.67, "tenure_months": 77}
    hits0, misses0 = _cache_counts()
    first = wait_done(client, submit(client, inputs=[row]).json()["id"])
    hits1, misses1 = _cache_counts()
    assert (hits1, misses1) == (hits0, misses0 + 1)
    # 77 and 77.0 are the same input: one cache entry.
    second = wait_done(
        client,
        submit(client, inputs=[{**row, "monthly_spend": 12345.67, "tenure_months": 77.0}]).json()[
            "id"
        ],
    )
    hits2, misses2 = _cache_counts()
    assert (hits2, misses2) == (hits1 + 1, misses1)
    assert second["result"] == first["result"]

    before = admin.get("/v1/models/churn").json()["production_version"]
    with session_scope() as session:
        new = train(session, "churn", promote="never", max_rows=2500)["version"]
    try:
        assert admin.post(f"/v1/models/churn/versions/{new}/promote").status_code == 200
        third = wait_done(client, submit(client, inputs=[row]).json()["id"])
        assert third["model_version"] == new
        hits3, misses3 = _cache_counts()
        assert (hits3, misses3) == (hits2, misses2 + 1)  # the new version missed
        assert third["result"]["predictions"][0]["score"] == _local(new, [row])[0]
        assert third["result"] != first["result"]
    finally:
        admin.post(f"/v1/models/churn/versions/{before}/promote")


def test_metrics_show_the_prediction_cache_hit_ratio(stack: Stack, client: httpx.Client) -> None:
    wait_done(client, submit(client, inputs=[ROW]).json()["id"])
    text = httpx.get(stack.api_url + "/metrics").text
    assert 'inferq_cache_requests_total{cache="predictions",outcome="hit"}' in text
    assert 'inferq_cache_requests_total{cache="predictions",outcome="miss"}' in text


def _idle_workers() -> None:
    """Let any delivery still waiting for more jobs give up (INFERQ_PREDICT_IDLE_S)."""
    time.sleep(3 * get_settings().predict_idle_s + 0.2)


def _redis() -> Redis:
    return Redis.from_url(get_settings().redis_url)


def test_jobs_committed_while_a_delivery_drains_wait_for_it_not_for_a_message(
    stack: Stack, client: httpx.Client
) -> None:
    from shared.batching.pending import bell_key, hand_over

    _idle_workers()
    redis = _redis()
    redis.set(bell_key(), "1", px=20_000)  # as while a delivery drains
    try:
        ids = [submit(client, inputs=[r]).json()["id"] for r in _rows(5)]
        time.sleep(0.5)
        with session_scope() as session:
            statuses = session.scalars(
                select(Job.status).where(Job.id.in_([uuid.UUID(i) for i in ids]))
            ).all()
        assert statuses == ["queued"] * 5  # no message went out for them
        metrics = httpx.get(stack.api_url + "/metrics").text
        assert 'inferq_pending_jobs{priority="normal"} 5.0' in metrics  # visible to operators
        hand_over()  # the draining delivery's successor takes them all
        jobs = [wait_done(client, i) for i in ids]
    finally:
        redis.delete(bell_key())
    assert [j["status"] for j in jobs] == ["succeeded"] * 5
    with session_scope() as session:
        workers = set(
            session.scalars(select(Job.worker).where(Job.id.in_([uuid.UUID(i) for i in ids])))
        )
    assert len(workers) == 1, workers  # one delivery, one batch


def test_a_redelivered_message_retakes_what_its_first_run_held(
    stack: Stack, client: httpx.Client
) -> None:
    """Its first run claimed the message's job and two popped ones, then died. The message
    comes back with the same task id (here as a retry): all three are taken again, and a
    job another live delivery holds is left alone."""
    from workers.tasks.predict import run

    _idle_workers()
    ids = [record_queued(client, {"inputs": [r]}) for r in _rows(4)]
    task_id = str(uuid.uuid4())
    alive = datetime.now(UTC)
    with session_scope() as session:
        for job_id, holder in zip(ids, ["dead:1", "dead:1", "dead:1", "other:1"], strict=True):
            session.execute(
                update(Job)
                .where(Job.id == uuid.UUID(job_id))
                .values(
                    status="running",
                    attempts=1,
                    worker=f"{holder}/{task_id if holder == 'dead:1' else 'other-task'}",
                    heartbeat_at=alive,
                )
            )
    assert run.apply(args=[[ids[0]]], task_id=task_id, retries=1).get() == 3
    for job_id in ids[:3]:
        job = wait_done(client, job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2)
    with session_scope() as session:
        other = session.get(Job, uuid.UUID(ids[3]))
        assert other is not None
        assert (other.status, other.worker) == ("running", "other:1/other-task")


def test_a_delivery_drains_for_a_bounded_time_then_hands_over(
    stack: Stack, client: httpx.Client
) -> None:
    from shared.batching.pending import ANNOUNCE, announce_args, bell_key
    from workers.tasks.predict import run

    _idle_workers()
    ids = [record_queued(client, {"inputs": [r]}) for r in _rows(3)]
    redis = _redis()
    keys, args = announce_args([], 60, [(uuid.UUID(i), "normal") for i in ids])
    if redis.register_script(ANNOUNCE)(keys=keys, args=args):
        redis.delete(bell_key())  # raised by this push: down again, only the task drains
    s = get_settings()
    saved = s.predict_drain_s, s.batch_max_jobs
    help_key = s.key("bell", "predict-help")
    redis.set(help_key, "1", px=20_000)  # no calls for help: only the hand-over may send
    s.predict_drain_s, s.batch_max_jobs = 0.0, 1
    try:
        assert run.apply(args=[[]]).get() == 1  # one batch of one, then time is up
    finally:
        s.predict_drain_s, s.batch_max_jobs = saved
        redis.delete(help_key)
    jobs = [wait_done(client, i) for i in ids]  # the fresh message drains the rest
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    with session_scope() as session:
        workers = [session.scalar(select(Job.worker).where(Job.id == uuid.UUID(i))) for i in ids]
    assert workers[0] != workers[1] == workers[2]


@pytest.mark.parametrize("prepare", [True, False])
def test_prediction_logs_are_written_alike_prepared_and_inline(
    stack: Stack, client: httpx.Client, prepare: bool
) -> None:
    from shared import sql
    from shared.batching.inference import PREDICTION_LOGS, prediction_logs
    from shared.db import autocommit

    job_id = record_queued(client)
    tricky = {**ROW, "plan_tier": "50% off, 'quoted' \\ $1"}  # survives quoting as is
    logs = [
        {
            "job_id": job_id,
            "row": i,
            "model": "churn",
            "version": 1,
            "inputs": tricky,
            "score": 0.25 + i,
            "label": i % 2 == 0,
        }
        for i in range(3)
    ]
    s = get_settings()
    saved = s.db_prepare
    s.db_prepare = prepare
    try:
        with autocommit() as conn:
            statement = prediction_logs(logs)
            assert statement is not None
            text = PREDICTION_LOGS.sql(
                statement[1], mogrify=conn.connection.cursor().mogrify, prepared=set()
            )
            assert ("EXECUTE inferq_prediction_logs(" in text) is prepare
            sql.run(conn, statement)
            sql.run(conn, statement)  # a redelivery: nothing written twice
    finally:
        s.db_prepare = saved
    with session_scope() as session:
        rows = session.scalars(
            select(PredictionLog)
            .where(PredictionLog.job_id == uuid.UUID(job_id))
            .order_by(PredictionLog.row)
        ).all()
    assert [(r.row, r.inputs, r.score, r.label) for r in rows] == [
        (0, tricky, 0.25, True),
        (1, tricky, 1.25, False),
        (2, tricky, 2.25, True),
    ]


def test_caches_can_live_in_a_redis_of_their_own(
    stack: Stack, client: httpx.Client, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """INFERQ_CACHE_REDIS_URL: the prediction and feature caches go to a Redis that may evict
    (allkeys-lru) without touching the queues, job state or counters in the main one."""
    from shared.batching.inference import run_predict_jobs
    from shared.db import get_engine
    from shared.devstack.embedded import EmbeddedRedis
    from shared.jobs.fields import JobRow

    other = EmbeddedRedis(tmp_path / "cache", appendonly=False)
    cache = Redis.from_url(other.start())
    main = Redis.from_url(get_settings().redis_url)
    try:
        row = {**ROW, "monthly_spend": 4321.25, "tenure_months": 77}
        jobs = [
            JobRow(
                uuid.uuid4(),
                "t",
                "predict",
                "churn",
                1,
                "running",
                {"inputs": [row]},
                None,
                1,
                datetime.now(UTC),
                None,
            ),
            JobRow(
                uuid.uuid4(),
                "default",  # the demo customers' tenant
                "predict",
                "churn",
                1,
                "running",
                {"entity_ids": [4242]},
                None,
                1,
                datetime.now(UTC),
                None,
            ),
        ]
        before = main.hgetall(get_settings().key("stats"))
        out = run_predict_jobs(get_engine(), main, ModelCache(), jobs, cache=cache)
        assert len(out.results) == 2
        prefix = get_settings().key("")
        assert any(k.startswith(f"{prefix}pred:".encode()) for k in cache.keys("*"))
        assert any(k.startswith(f"{prefix}feat:".encode()) for k in cache.keys("*"))
        after = main.hgetall(get_settings().key("stats"))
        assert after != before  # the hit/miss counters stay with the main Redis
        assert not cache.exists(get_settings().key("stats"))
    finally:
        other.stop()


def test_predictions_go_on_when_the_prediction_cache_is_down(stack: Stack) -> None:
    """The cache is an optimisation: a cache Redis that does not answer (here: nothing
    listens on its port) costs the lookups, never the job (it was 'prediction_failed')."""
    from redis import Redis

    from shared.batching.inference import _predict
    from shared.db import session_scope
    from shared.devstack.embedded import free_port
    from shared.models.registry import ModelCache

    with session_scope() as session:
        model = ModelCache().get(session, "churn", 1)
    dead = Redis(port=free_port(), socket_connect_timeout=0.5)
    stats = Redis.from_url(os.environ["INFERQ_REDIS_URL"]).pipeline(transaction=False)
    preds = _predict(model, [ROW, {**ROW, "support_tickets": 9}], dead, stats)
    assert len(preds) == 2 and all(0 <= p["score"] <= 1 for p in preds)


def test_the_announce_script_keeps_hot_copies_it_finds_and_rings_the_doorbell_once() -> None:
    """The API's one call after a commit: hot copies SET NX, the pending ids in order on
    their priority's list, the wake token, and the doorbell raised only if it was down
    (on keys of the test's own, so no worker of the suite's stack sees them)."""
    from shared.batching.pending import ANNOUNCE, PENDING_TTL_S, announce_args

    redis = _redis()
    prefix = get_settings().redis_prefix
    script = redis.register_script(ANNOUNCE)

    def own(keys: list[str]) -> list[str]:
        return [k.replace(f"{prefix}:", f"{prefix}-announce-test:", 1) for k in keys]

    normal, high = [uuid.uuid4() for _ in range(3)], [uuid.uuid4()]
    hot = [(f"{prefix}:job:a", '{"v": 1}'), (f"{prefix}:job:b", '{"v": 2}')]
    keys, args = announce_args(hot, 60, [(i, "normal") for i in normal] + [(high[0], "high")])
    keys = own(keys)
    later, later_args = announce_args([], 60, [(uuid.uuid4(), "low")])
    later = own(later)
    try:
        redis.set(keys[3], '{"v": "terminal"}')  # a worker wrote job b's end first
        assert script(keys=keys, args=args) == 1  # the doorbell was down: send a message
        # Hot copies alone (score and train jobs) never touch the doorbell.
        assert script(keys=keys[:4], args=[2, 60, PENDING_TTL_S, 2000, "x", "y"]) == 0
        assert script(keys=later, args=later_args) == 0  # the doorbell is up: no message
        assert redis.get(keys[2]) == b'{"v": 1}' and redis.ttl(keys[2]) > 0
        assert redis.get(keys[3]) == b'{"v": "terminal"}'
        lists = {k: [uuid.UUID(v.decode()) for v in redis.lrange(k, 0, -1)] for k in keys[4:]}
        assert sorted(lists.values(), key=len) == [high, normal]
        assert all(0 < redis.ttl(k) <= PENDING_TTL_S for k in keys[4:])
        assert redis.llen(later[-1]) == 1
        assert redis.lrange(keys[1], 0, -1) == [b"1"]  # one wake token, however many pushes
        assert 0 < redis.pttl(keys[0]) <= 2000
    finally:
        redis.delete(*keys, *later)
