"""The jobs API end to end: API process → Postgres → broker → worker process → Redis/Postgres."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from sqlalchemy import select, text

from shared.config import get_settings
from shared.db import session_scope
from shared.devstack.demo import CUSTOMER_COLUMNS
from shared.orm import Job, PredictionLog
from tests.conftest import ROW, make_client, record_queued, submit, wait_done


def _local_scores(rows: list[dict], version: int = 1) -> list[float]:
    """What the registered artifact itself predicts, loaded here independently of the worker."""
    from shared.models.registry import ModelCache

    with session_scope() as session:
        model = ModelCache().get(session, "churn", version)
    from shared.models.encoding import encode_rows

    scores, _ = model.predict(encode_rows(rows, model.schema))
    return scores.tolist()


def test_submit_then_poll_returns_the_models_probability(client: httpx.Client) -> None:
    r = submit(client, inputs=[ROW], metadata={"request": "abc"})
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "queued" and body["model"] == "churn"
    assert body["model_version"] == 1
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    # The 202 is a promise: the row is in Postgres before the answer.
    with session_scope() as session:
        assert session.get(Job, uuid.UUID(body["id"])) is not None

    job = wait_done(client, body["id"])
    assert job["status"] == "succeeded", job
    (pred,) = job["result"]["predictions"]
    assert 0.0 < pred["score"] < 1.0
    assert pred["score"] == _local_scores([ROW])[0]
    assert pred["label"] is (pred["score"] >= 0.5)
    assert job["model_version"] == 1
    assert job["metadata"] == {"request": "abc"}
    assert job["progress"] == {"done": 1, "total": 1}
    assert job["started_at"] and job["finished_at"] and job["error"] is None


def test_result_is_durable_and_hot_and_every_row_is_logged(client: httpx.Client) -> None:
    rows = [ROW, {**ROW, "tenure_months": 100}, {**ROW, "support_tickets": 40}]
    job_id = submit(client, inputs=rows).json()["id"]
    job = wait_done(client, job_id)
    assert job["status"] == "succeeded", job
    assert [p["score"] for p in job["result"]["predictions"]] == _local_scores(rows)
    with session_scope() as session:
        stored = session.get(Job, uuid.UUID(job_id))
        assert stored is not None and stored.status == "succeeded"
        assert stored.result == job["result"]
        logs = session.scalars(
            select(PredictionLog)
            .where(PredictionLog.job_id == uuid.UUID(job_id))
            .order_by(PredictionLog.row)
        ).all()
    assert [(log.row, log.version, log.inputs) for log in logs] == [
        (i, 1, row) for i, row in enumerate(rows)
    ]
    from redis import Redis

    hot = Redis.from_url(get_settings().redis_url).get(get_settings().key("job", job_id))
    assert hot is not None
    assert json.loads(hot)["view"]["status"] == "succeeded"
    assert Redis.from_url(get_settings().redis_url).ttl(get_settings().key("job", job_id)) > 3600


def test_wait_answers_as_soon_as_the_job_ends(client: httpx.Client) -> None:
    job_id = submit(client, inputs=[ROW]).json()["id"]
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
    assert job["status"] == "succeeded", job
    assert time.monotonic() - start < 5


def test_wait_on_a_job_that_does_not_end_returns_after_the_wait(client: httpx.Client) -> None:
    job_id = record_queued(client)
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()
    elapsed = time.monotonic() - start
    assert job["status"] == "queued"
    assert 0.9 < elapsed < 4


def test_entity_ids_read_features_from_the_customers_table(owner: httpx.Client) -> None:
    client = owner
    ids = [5, 17, 123_456]
    job = wait_done(client, submit(client, entity_ids=ids).json()["id"])
    assert job["status"] == "succeeded", job
    cols = ", ".join(CUSTOMER_COLUMNS)
    with session_scope() as session:
        rows = (
            session.execute(
                text(f"SELECT id, {cols} FROM customers WHERE id = ANY(:ids) ORDER BY id"),
                {"ids": ids},
            )
            .mappings()
            .all()
        )
    features = [{c: r[c] for c in CUSTOMER_COLUMNS} for r in rows]
    preds = job["result"]["predictions"]
    assert [p["entity_id"] for p in preds] == ids
    assert [p["score"] for p in preds] == _local_scores(features)


def test_cancel_a_queued_job_and_the_worker_leaves_it_cancelled(client: httpx.Client) -> None:
    job_id = record_queued(client)
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
    # The message arrives late (say, the sweeper sent it): the worker must not run it.
    from shared.broker import enqueue

    enqueue([(uuid.UUID(job_id), "predict", "normal")])
    time.sleep(1.5)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["result"] is None


def test_cancel_an_ended_job_is_409(client: httpx.Client) -> None:
    job_id = submit(client, inputs=[ROW]).json()["id"]
    assert wait_done(client, job_id)["status"] == "succeeded"
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 409
    assert "succeeded" in r.json()["detail"]


@pytest.fixture
def trainer(stack):  # type: ignore[no-untyped-def]
    """A client of a fresh tenant that may also train (models:admin)."""
    with make_client(stack, scopes=("jobs:write", "jobs:read", "models:admin")) as c:
        yield c


def test_list_filters_and_paginates_newest_first(trainer: httpx.Client) -> None:
    client = trainer
    ids = [submit(client, inputs=[ROW]).json()["id"] for _ in range(5)]
    train_id = submit(client, type="train", promote="never").json()["id"]
    for i in ids:
        wait_done(client, i)
    wait_done(client, train_id, timeout=60)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"type": "predict", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        assert all(j["type"] == "predict" for j in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    trains = client.get("/v1/jobs", params={"type": "train"}).json()["items"]
    assert [j["id"] for j in trains] == [train_id]
    done = client.get("/v1/jobs", params={"status": "succeeded", "limit": 500}).json()["items"]
    assert len(done) == 6
    assert client.get("/v1/jobs", params={"model": "demand"}).json()["items"] == []


def test_idempotency_key_returns_the_first_job(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]}, headers=headers)
    again = client.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.post(
        "/v1/jobs",
        json={"model": "churn", "inputs": [{**ROW, "tenure_months": 3}]},
        headers=headers,
    )
    assert other.status_code == 409


def test_tenants_never_see_each_others_jobs(stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, inputs=[ROW]).json()["id"]
    wait_done(client, job_id)
    with make_client(stack) as other:
        r = other.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 404
        assert r.json() == other.get(f"/v1/jobs/{uuid.uuid4()}").json()
        assert other.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert other.get("/v1/jobs").json()["items"] == []
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200


def test_train_job_registers_a_version_and_models_lists_it(client, admin) -> None:  # type: ignore[no-untyped-def]
    before = admin.get("/v1/models/churn").json()
    job = wait_done(admin, submit(admin, type="train", promote="never").json()["id"], timeout=60)
    assert job["status"] == "succeeded", job
    assert job["result"]["promoted"] is False
    assert job["result"]["metrics"]["auc"] > 0.7
    after = admin.get("/v1/models/churn").json()
    assert len(after["versions"]) == len(before["versions"]) + 1
    assert after["production_version"] == before["production_version"]
    assert {f["name"] for f in after["input_schema"]["features"]} == set(CUSTOMER_COLUMNS)
    names = {m["name"] for m in client.get("/v1/models").json()}
    assert {"churn", "demand"} <= names


def test_demand_regressor_returns_values_without_labels(client: httpx.Client) -> None:
    row = {
        "price": 20.0,
        "promo": 1,
        "day_of_week": 6,
        "temperature_c": 25.0,
        "store_size": "large",
    }
    job = wait_done(client, submit(client, model="demand", inputs=[row]).json()["id"])
    (pred,) = job["result"]["predictions"]
    assert pred["label"] is None and pred["score"] > 100


def test_a_burst_of_long_polls_is_answered_not_refused(stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    """300 simultaneous ?wait= requests share a bounded Redis pool: no 503s, no errors."""
    import asyncio

    queued = record_queued(client)  # never sent: every poll waits out its 2 s
    done = submit(client, inputs=[ROW]).json()["id"]
    wait_done(client, done)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=stack.api_url,
            headers=dict(client.headers),
            timeout=60,
            limits=httpx.Limits(max_connections=300),
        ) as c:
            calls = [
                c.get(f"/v1/jobs/{queued if i % 2 else done}", params={"wait": 2})
                for i in range(300)
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 300
