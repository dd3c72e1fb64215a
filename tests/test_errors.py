"""Every row of the error table, against the running API."""

from __future__ import annotations

import json
import math
import time
import uuid

import httpx
import pytest
from sqlalchemy import text

from shared.db import session_scope
from tests.conftest import ROW, make_client, start_api, submit


def _detail(r: httpx.Response) -> list[dict]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def _locs(r: httpx.Response) -> set[tuple]:
    return {tuple(e["loc"]) for e in _detail(r)}


# --- 401 / 403 ----------------------------------------------------------------------------


def test_no_key_is_401(stack) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(stack.api_url + "/v1/jobs", json={"model": "churn", "inputs": [ROW]})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["detail"]


def test_bad_key_is_401(stack) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(stack.api_url + "/v1/jobs", headers={"Authorization": "Bearer iq_wrong"})
    assert r.status_code == 401


def test_missing_scope_is_403(stack) -> None:  # type: ignore[no-untyped-def]
    with make_client(stack, scopes=("jobs:read",)) as reader:
        r = submit(reader, inputs=[ROW])
        assert r.status_code == 403
        assert "jobs:write" in r.json()["detail"]
        r = reader.post("/v1/models/churn/versions/1/promote")
        assert r.status_code == 403
        assert "models:admin" in r.json()["detail"]


# --- 404 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_unknown_job_is_404(client: httpx.Client, job_id: str) -> None:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404
    assert r.json() == {"detail": "job not found"}
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_an_unknown_model_or_version_is_422_with_what_was_sent(client: httpx.Client) -> None:
    r = submit(client, model="nosuchmodel", inputs=[ROW])
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {
            "type": "value_error",
            "loc": ["body", "model"],
            "msg": "unknown model 'nosuchmodel'",
            "input": "nosuchmodel",
        }
    ]
    r = submit(client, version=999, inputs=[ROW])
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "version"] and err["input"] == 999, err


def test_unknown_model_resource_is_404(admin: httpx.Client) -> None:
    assert admin.get("/v1/models/nope").status_code == 404
    assert admin.post("/v1/models/churn/versions/999/promote").status_code == 404


# --- 409 ----------------------------------------------------------------------------------
# (idempotency reuse and cancelling an ended job: see test_jobs.py)


# --- 413 ----------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_before_it_is_read(client: httpx.Client) -> None:
    big = b'{"model": "churn", "inputs": [' + b" " * (8 * 1024 * 1024 + 10) + b"]}"
    r = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "INFERQ_MAX_BODY_BYTES" in r.json()["detail"]


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "churn", "inputs": ['
        for _ in range(9):
            yield b" " * (1024 * 1024)
        yield b"]}"

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_too_many_rows_is_413_naming_the_field(client: httpx.Client) -> None:
    r = submit(client, inputs=[ROW] * 10_001)
    assert r.status_code == 413
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "inputs"] and "10000" in err["msg"]
    r = submit(client, entity_ids=list(range(1, 10_002)))
    assert r.status_code == 413


# --- 422 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "kind"),
    [
        ({"tenure_months": None}, "tenure_months", "missing"),
        ({"favourite_colour": "blue"}, "favourite_colour", "extra_forbidden"),
        ({"tenure_months": "12"}, "tenure_months", "int_type"),
        ({"tenure_months": 12.5}, "tenure_months", "int_from_float"),
        ({"is_enterprise": True}, "is_enterprise", "int_type"),
        ({"monthly_spend": "a lot"}, "monthly_spend", "float_type"),
        ({"contract_type": 3}, "contract_type", "string_type"),
        ({"tenure_months": 0}, "tenure_months", "greater_than_equal"),
        ({"feature_usage_pct": 1.01}, "feature_usage_pct", "less_than_equal"),
        ({"monthly_spend": 100_000.5}, "monthly_spend", "less_than_equal"),
        ({"plan_tier": "platinum"}, "plan_tier", "enum"),
    ],
)
def test_bad_field_is_422_naming_row_and_field(
    client: httpx.Client, change: dict, field: str, kind: str
) -> None:
    bad = {**ROW, **change}
    if change.get(field, 0) is None:
        del bad[field]
    r = submit(client, inputs=[ROW, ROW, bad])
    (err,) = _detail(r)
    assert err["loc"] == ["body", "inputs", 2, field]
    assert err["type"] == kind
    assert err["msg"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_422(client: httpx.Client, literal: str) -> None:
    body = json.dumps({"model": "churn", "inputs": [{**ROW, "monthly_spend": 1.5}]})
    body = body.replace("1.5", literal)
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    (err,) = _detail(r)
    assert err["loc"] == ["body", "inputs", 0, "monthly_spend"]
    assert err["type"] == "finite_number"
    assert not (isinstance(err["input"], float) and math.isnan(err["input"]))


def test_bounds_are_inclusive(client: httpx.Client) -> None:
    edge = {
        **ROW,
        "tenure_months": 1,
        "feature_usage_pct": 1,
        "monthly_spend": 100_000,
        "last_login_days_ago": 365,
        "is_enterprise": 1,
        "contract_type": "multi-year",
    }
    assert submit(client, inputs=[edge]).status_code == 202


def test_many_bad_rows_report_a_bounded_list(client: httpx.Client) -> None:
    r = submit(client, inputs=[{**ROW, "plan_tier": "x"}] * 500)
    errors = _detail(r)
    assert 1 < len(errors) <= 50
    assert errors[0]["loc"] == ["body", "inputs", 0, "plan_tier"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"model": "churn", "inputs": []}, ("body", "inputs")),
        ({"model": "churn"}, ("body", "inputs")),
        ({"model": "churn", "inputs": [ROW], "entity_ids": [1]}, ("body", "inputs")),
        ({"model": "nope", "inputs": [ROW]}, ("body", "model")),
        ({"model": "churn", "version": 99, "inputs": [ROW]}, ("body", "version")),
        ({"model": "churn", "inputs": ["not an object"]}, ("body", "inputs", 0)),
        ({"model": "churn", "entity_ids": [1, 987654321]}, ("body", "entity_ids", 1)),
        ({"model": "churn", "entity_ids": ["1"]}, ("body", "entity_ids", 0)),
        ({"model": "churn", "inputs": [ROW], "colour": "red"}, ("body", "colour")),
        ({"model": "churn", "type": "nope", "inputs": [ROW]}, ("body", "type")),
        ({"model": "churn", "inputs": [ROW], "priority": "urgent"}, ("body", "priority")),
        ({"model": "churn", "inputs": [ROW], "callback_url": "ftp://x"}, ("body", "callback_url")),
        ({"model": "churn", "inputs": [ROW], "segment": {}}, ("body", "segment")),
        ({"model": "demand", "entity_ids": [1]}, ("body", "entity_ids")),
    ],
)
def test_bad_request_is_422_naming_the_field(client: httpx.Client, body: dict, loc: tuple) -> None:
    assert loc in _locs(client.post("/v1/jobs", json=body))


def test_training_an_untrainable_model_is_422(admin: httpx.Client) -> None:
    r = admin.post("/v1/jobs", json={"model": "lasso", "type": "train"})
    assert ("body", "model") in _locs(r)


def test_non_json_body_is_422(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("wait", ["31", "-1", "soon"])
def test_wait_out_of_range_is_422(client: httpx.Client, wait: str) -> None:
    job_id = submit(client, inputs=[ROW]).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}", params={"wait": wait})
    assert ("query", "wait") in _locs(r)


def test_bad_list_parameters_are_422(client: httpx.Client) -> None:
    assert ("query", "status") in _locs(client.get("/v1/jobs", params={"status": "done"}))
    assert ("query", "limit") in _locs(client.get("/v1/jobs", params={"limit": 0}))
    assert ("query", "cursor") in _locs(client.get("/v1/jobs", params={"cursor": "zzz"}))


def test_rejected_requests_record_nothing(client: httpx.Client) -> None:
    tenant_jobs = client.get("/v1/jobs").json()["items"]
    submit(client, inputs=[{**ROW, "plan_tier": "x"}])
    submit(client, inputs=[ROW] * 10_001)
    assert client.get("/v1/jobs").json()["items"] == tenant_jobs


# --- 429 ----------------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after(stack) -> None:  # type: ignore[no-untyped-def]
    with make_client(stack, rate=1.0) as slow:
        first = slow.get("/v1/jobs")
        second = slow.get("/v1/jobs")
    assert first.status_code == 200
    assert second.status_code == 429
    assert int(second.headers["retry-after"]) >= 1
    assert "rate limit" in second.json()["detail"]


# --- 503 ----------------------------------------------------------------------------------


def _count_jobs(tenant: str) -> int:
    with session_scope() as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM jobs WHERE tenant = :t"), {"t": tenant}
            ).scalar_one()
        )


def _submits_are_refused(stack, env: dict[str, str], what: str, *, times: int = 1) -> None:  # type: ignore[no-untyped-def]
    """An API started with ``env`` answers submits 503 (``what`` unavailable) and records
    nothing."""
    api, url = start_api(env)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    try:
        with make_client(stack, tenant=tenant, base_url=url) as c:
            for _ in range(times):
                r = submit(c, inputs=[ROW])
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "5"
                assert f"{what} unavailable" in r.json()["detail"]
                assert "retry later" in r.json()["detail"]
        assert _count_jobs(tenant) == 0
    finally:
        api.stop()


def test_broker_down_is_503_and_nothing_is_accepted(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.devstack.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    _submits_are_refused(stack, {"INFERQ_REDIS_URL": dead, "INFERQ_BROKER_URL": dead}, "broker")


def test_database_down_is_503(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.devstack.embedded import free_port

    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/inferq"
    api, url = start_api({"INFERQ_DATABASE_URL": dead})
    try:
        r = httpx.post(
            url + "/v1/jobs",
            json={"model": "churn", "inputs": [ROW]},
            headers={"Authorization": "Bearer whatever"},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"]["ok"] is False
    finally:
        api.stop()


def test_a_database_that_refuses_the_insert_is_503_and_records_nothing(stack) -> None:  # type: ignore[no-untyped-def]
    """Keys and models can be read, the job cannot be written: the group commit's own
    connection reports it, and the client is told to retry instead of being promised."""
    from sqlalchemy.engine import make_url

    from shared.config import get_settings

    role = f"inferq_ro_{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        session.execute(text(f"CREATE ROLE {role} LOGIN"))
        session.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        session.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    read_only = make_url(get_settings().database_url).set(username=role)
    try:
        # Twice: the second batch opens a fresh connection and meets the same refusal.
        env = {"INFERQ_DATABASE_URL": read_only.render_as_string(hide_password=False)}
        _submits_are_refused(stack, env, "database", times=2)
    finally:
        with session_scope() as session:
            session.execute(text(f"DROP OWNED BY {role}"))
            session.execute(text(f"DROP ROLE {role}"))


def test_a_submit_answered_503_is_never_recorded_afterwards(stack) -> None:  # type: ignore[no-untyped-def]
    """The API stops waiting for its INSERT after a few seconds and answers 503; the server
    must have given up on that INSERT first, or it would commit later, behind the 503 (here
    it waits on another transaction's row with the same Idempotency-Key)."""
    from datetime import UTC, datetime

    from shared.db import get_engine

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    key = f"held-{uuid.uuid4().hex[:8]}"
    with make_client(stack, tenant=tenant) as c:
        raw = get_engine().raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(
                "INSERT INTO jobs (id, tenant, type, model, status, priority, request, "
                "idempotency_key, attempts, created_at) VALUES "
                "(%s, %s, 'predict', 'churn', 'queued', 'normal', '{}', %s, 0, %s)",
                (str(uuid.uuid4()), tenant, key, datetime.now(UTC)),
            )  # not committed: the API's INSERT with the same key waits for it
            r = c.post(
                "/v1/jobs",
                json={"model": "churn", "inputs": [ROW]},
                headers={"Idempotency-Key": key},
            )
            assert r.status_code == 503, r.text
        finally:
            raw.rollback()  # the held row goes; a still-running INSERT would now commit
            raw.close()
        time.sleep(1.0)
        assert _count_jobs(tenant) == 0


@pytest.fixture
def pg_proxy():  # type: ignore[no-untyped-def]
    from shared.config import get_settings
    from tests.pgproxy import PgProxy

    proxy = PgProxy(get_settings().database_url)
    yield proxy
    proxy.close()


def _job_of(tenant: str) -> dict | None:
    with session_scope() as session:
        row = session.execute(
            text("SELECT id, status, attempts FROM jobs WHERE tenant = :t"), {"t": tenant}
        ).first()
        return dict(row._mapping) if row else None


def test_a_lost_insert_answer_is_withdrawn_before_the_503(stack, pg_proxy) -> None:  # type: ignore[no-untyped-def]
    """The INSERT commits but its answer never arrives: the API takes the job back by id
    before it answers 503, so a client that retries does not get it run twice."""
    api, url = start_api({"INFERQ_DATABASE_URL": pg_proxy.url})
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with make_client(stack, tenant=tenant, base_url=url) as c:
            pg_proxy.lose_next_insert()
            r = c.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
            assert pg_proxy.inserts_lost == 1
            assert r.status_code == 503, r.text
            assert "nothing was accepted" in r.json()["detail"]
            assert _job_of(tenant) is None
    finally:
        api.stop()


def test_a_lost_insert_answer_with_postgres_away_is_marked_withdrawn(stack, pg_proxy) -> None:  # type: ignore[no-untyped-def]
    """Postgres cannot be reached to take the job back: a withdrawal mark in Redis makes
    the sweeper delete the recorded job instead of sending it, so the 503 stays true."""
    from datetime import timedelta

    from shared.jobs.store import withdrawn_key
    from workers.process import redis_client
    from workers.tasks.maintenance import sweep_once

    api, url = start_api({"INFERQ_DATABASE_URL": pg_proxy.url})
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with make_client(stack, tenant=tenant, base_url=url) as c:
            pg_proxy.lose_next_insert(refuse_for=8)
            r = c.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
            assert r.status_code == 503, r.text
            job = _job_of(tenant)
            assert job is not None and job["status"] == "queued"  # the INSERT did commit
            assert redis_client().get(withdrawn_key(job["id"])) is not None
            with session_scope() as session:  # old enough for the sweeper to look at it
                session.execute(
                    text("UPDATE jobs SET created_at = created_at - :d WHERE id = :id"),
                    {"d": timedelta(minutes=5), "id": job["id"]},
                )
            sweep_once()
            assert _job_of(tenant) is None  # deleted, never sent
            assert redis_client().get(withdrawn_key(job["id"])) is None
    finally:
        api.stop()


def test_a_lost_insert_answer_with_postgres_and_redis_away_names_the_job(stack, pg_proxy) -> None:  # type: ignore[no-untyped-def]
    """Neither Postgres nor Redis can take the job back: the 503 says the outcome is
    unknown and gives the job's id, which the ledger does hold."""
    from shared.devstack.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    api, url = start_api({"INFERQ_DATABASE_URL": pg_proxy.url, "INFERQ_REDIS_URL": dead})
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with make_client(stack, tenant=tenant, base_url=url) as c:
            pg_proxy.lose_next_insert(refuse_for=8)
            r = c.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["outcome"] == "unknown"
            assert f"GET /v1/jobs/{body['job_id']}" in body["detail"]
            job = _job_of(tenant)
            assert job is not None and str(job["id"]) == body["job_id"]
    finally:
        api.stop()


def test_a_retry_with_its_key_replaces_a_job_marked_withdrawn(stack, pg_proxy) -> None:  # type: ignore[no-untyped-def]
    """The first request was told 503 and its job marked withdrawn, though its INSERT had
    committed. The retry with the same Idempotency-Key completes the withdrawal and
    records a job of its own (202), which runs: the 503 stayed true, and nothing runs
    twice."""
    from shared.jobs.store import withdrawn_key
    from workers.process import redis_client

    api, url = start_api({"INFERQ_DATABASE_URL": pg_proxy.url})
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with make_client(stack, tenant=tenant, base_url=url) as c:
            body, key = {"model": "churn", "inputs": [ROW]}, {"Idempotency-Key": "retry-me"}
            pg_proxy.lose_next_insert(refuse_for=8)
            assert c.post("/v1/jobs", json=body, headers=key).status_code == 503
            first = _job_of(tenant)
            assert first is not None and redis_client().get(withdrawn_key(first["id"]))
            while pg_proxy.refusing():  # until Postgres is back
                time.sleep(0.1)
            r = c.post("/v1/jobs", json=body, headers=key)
            assert r.status_code == 202, r.text
            assert r.json()["id"] != str(first["id"])
            assert redis_client().get(withdrawn_key(first["id"])) is None
            done = c.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 20}).json()
            assert done["status"] == "succeeded", done
            again = c.post("/v1/jobs", json=body, headers=key)  # a plain replay from here on
            assert again.status_code == 200 and again.json()["id"] == r.json()["id"]
            with session_scope() as session:
                ids = session.execute(
                    text("SELECT id FROM jobs WHERE tenant = :t"), {"t": tenant}
                ).scalars()
                assert [str(i) for i in ids] == [r.json()["id"]]
    finally:
        api.stop()
