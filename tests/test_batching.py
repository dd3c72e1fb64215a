"""Micro-batching: jobs queued together are predicted in one call per model version."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from redis import Redis
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.inputs import encode_rows
from shared.orm import Job, PredictionLog
from shared.registry import ModelCache
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
    with session_scope() as session:
        model = ModelCache().get(session, "churn", version)
    return model.predict(encode_rows(rows, model.schema))[0].tolist()


def _send_as_one_batch(job_ids: list[str]) -> None:
    celery_app.send_task("predict.run", args=[job_ids], queue="predict")


def test_concurrent_jobs_are_batched_and_match_one_at_a_time(stack: Stack, client) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(120)
    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(lambda r: submit(client, inputs=[r]).json()["id"], rows))
    jobs = [wait_done(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    batched = [j["result"]["predictions"][0]["score"] for j in jobs]
    assert batched == _local(1, rows)  # one row at a time, by the same artifact
    with session_scope() as session:
        workers = session.scalars(select(Job.worker).where(Job.id.in_(ids))).all()
    per_message = {}
    for w in workers:
        per_message[w] = per_message.get(w, 0) + 1
    assert max(per_message.values()) > 1  # some messages carried several jobs
    assert len(per_message) < len(ids)


def test_versions_are_never_mixed_in_one_batch(stack: Stack, client: httpx.Client) -> None:
    from shared.training import train

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
    from shared.training import train

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
