"""The fast path answers exactly as the FastAPI routes it stands in for."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.conftest import ROW, Stack, make_client, start_api, wait_done


def _requests(job_id: str) -> list[tuple[str, str, dict]]:
    nan_body = json.dumps({"model": "churn", "inputs": [{**ROW, "monthly_spend": 1.5}]})
    return [
        ("POST", "/v1/jobs", {"json": {"model": "churn", "inputs": [ROW], "colour": 1}}),
        ("POST", "/v1/jobs", {"json": {"model": "churn", "inputs": [{**ROW, "plan_tier": 3}]}}),
        (
            "POST",
            "/v1/jobs",
            {
                "content": nan_body.replace("1.5", "NaN"),
                "headers": {"content-type": "application/json"},
            },
        ),
        (
            "POST",
            "/v1/jobs",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
        ),
        ("POST", "/v1/jobs", {"json": {"model": "nope", "inputs": [ROW]}}),
        ("POST", "/v1/jobs", {"json": {"model": "churn", "inputs": [ROW] * 10_001}}),
        (
            "POST",
            "/v1/jobs",
            {
                "json": {"model": "churn", "inputs": [ROW]},
                "headers": {"Idempotency-Key": "k" * 300},
            },
        ),
        ("POST", "/v1/jobs", {"json": ["not", "an", "object"]}),
        ("GET", f"/v1/jobs/{job_id}", {"params": {"wait": "31"}}),
        ("GET", f"/v1/jobs/{job_id}", {"params": {"wait": "soon"}}),
        ("GET", f"/v1/jobs/{job_id}", {"params": {"wait": "-1"}}),
        ("GET", f"/v1/jobs/{uuid.uuid4()}", {}),
        ("GET", "/v1/jobs/not-a-uuid", {}),
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("GET", f"/v1/jobs/{job_id}", {"params": {"wait": "1"}}),
    ]


def _strip(body: object) -> object:
    """Error bodies compare whole; FastAPI's json_invalid context text may differ."""
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        return {"detail": [{k: v for k, v in e.items() if k != "ctx"} for e in body["detail"]]}
    return body


def test_fast_path_and_fastapi_routes_answer_alike(stack: Stack) -> None:
    slow_api, slow_url = start_api({"INFERQ_FAST_PATH": "false"})
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    try:
        with (
            make_client(stack, tenant=tenant) as fast,
            make_client(stack, tenant=tenant, base_url=slow_url) as slow,
        ):
            job_id = fast.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]}).json()["id"]
            wait_done(fast, job_id)
            for method, path, kwargs in _requests(job_id):
                a = fast.request(method, path, **kwargs)
                b = slow.request(method, path, **kwargs)
                assert (a.status_code, _strip(a.json())) == (b.status_code, _strip(b.json())), (
                    method,
                    path,
                    kwargs.get("params"),
                    a.text[:300],
                    b.text[:300],
                )
            for client in (fast, slow):  # auth errors, with and without a key
                bare = httpx.Client(base_url=str(client.base_url), timeout=30)
                r1 = bare.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
                r2 = bare.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer nope"})
                assert (r1.status_code, r2.status_code) == (401, 401)
                assert r1.headers["www-authenticate"] == "Bearer"
            ok_fast = fast.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
            ok_slow = slow.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]})
            assert ok_fast.status_code == ok_slow.status_code == 202
            assert ok_fast.json().keys() == ok_slow.json().keys()
            assert ok_fast.headers["location"].startswith("/v1/jobs/")
            assert ok_slow.headers["location"].startswith("/v1/jobs/")
        with make_client(stack, tenant=tenant, scopes=("jobs:read",)) as reader:
            assert (
                reader.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]}).status_code == 403
            )
    finally:
        slow_api.stop()


def test_a_route_added_under_v1_jobs_is_served_not_taken_for_a_job_id() -> None:
    """The fast path serves only the exact routes it owns: GET /v1/jobs/<a job id> and
    POST /v1/jobs. A new route beside them reaches FastAPI."""
    import asyncio

    from api.fastpath import FastPath
    from api.main import create_api

    api = create_api()

    @api.get("/v1/jobs/stats")
    def stats() -> dict[str, int]:
        return {"jobs": 7}

    # Ahead of /v1/jobs/{job_id}, as a route declared before it in api.routes.jobs would be.
    api.router.routes.insert(0, api.router.routes.pop())

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=FastPath(api, api=api))
        async with httpx.AsyncClient(transport=transport, base_url="http://inferq") as c:
            return await c.get(path)

    r = asyncio.run(get("/v1/jobs/stats"))
    assert r.status_code == 200 and r.json() == {"jobs": 7}
