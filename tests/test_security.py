"""Promises under attack: scopes that mean what they say, values that cannot break a
neighbour's commit, bounded caches, callbacks that go where they were checked, secrets
kept off command lines and out of public answers."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from shared.db import session_scope
from shared.jobs.callbacks import CallbackRefusedError, check_url
from tests.conftest import (
    ROOT,
    ROW,
    Stack,
    make_client,
    record_queued,
    start_api,
    start_process,
    submit,
    wait_done,
    wait_for,
)
from tests.test_callbacks import Receiver

# --- scopes --------------------------------------------------------------------------------


def test_training_needs_models_admin(stack: Stack, client: httpx.Client, admin) -> None:
    r = submit(client, type="train", promote="always")
    assert r.status_code == 403
    assert "models:admin" in r.json()["detail"]
    job = wait_done(admin, submit(admin, type="train", promote="never").json()["id"], timeout=60)
    assert job["status"] == "succeeded"


# --- values a group commit cannot take -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_metadata", "where"),
    [
        ('{"note": "a\\u0000b"}', ["body", "metadata", "note"]),
        ('{"a\\u0000": 1}', ["body", "metadata", "a\x00"]),
        ('{"x": NaN}', ["body", "metadata", "x"]),
        ('{"x": [1, Infinity]}', ["body", "metadata", "x", 1]),
        ('{"x": "\\ud800"}', ["body", "metadata", "x"]),
    ],
)
def test_a_value_jsonb_refuses_is_422_and_its_neighbours_are_accepted(
    stack: Stack, client: httpx.Client, raw_metadata: str, where: list
) -> None:
    import json

    good = json.dumps({"model": "churn", "inputs": [ROW]}).encode()
    bad = good[:-1] + b', "metadata": ' + raw_metadata.encode() + b"}"
    headers = {"content-type": "application/json"}

    def post(body: bytes) -> httpx.Response:
        return client.post("/v1/jobs", content=body, headers=headers)

    # Sent together, so they share group commits with the bad one.
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, [bad, *[good] * 11, bad]))
    for r in (answers[0], answers[-1]):
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == where
    assert all(r.status_code == 202 for r in answers[1:-1]), [r.text for r in answers]
    for r in answers[1:-1]:
        assert wait_done(client, r.json()["id"])["status"] == "succeeded"


def test_a_string_jsonb_refuses_in_an_input_row_or_segment_is_422(stack, client) -> None:
    r = submit(client, inputs=[{**ROW, "plan_tier": "gro\x00wth"}])
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "inputs", 0, "plan_tier"]
    r = submit(client, type="score", segment={"plan_tier": "\x00"})
    assert r.status_code == 422
    r = submit(client, model="churn\x00", inputs=[ROW])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]


def test_a_batch_the_database_refuses_is_retried_job_by_job(stack: Stack, client) -> None:
    """A value that slipped past validation fails its own job (422), not its batch (503)."""
    from datetime import UTC, datetime

    from api.submitter import GroupCommitter, JobRejectedError
    from shared.jobs.fields import JobRow
    from tests.conftest import tenant_of

    tenant = tenant_of(client)

    def job(request: dict) -> JobRow:
        return JobRow(
            id=uuid.uuid4(),
            tenant=tenant,
            type="predict",
            model="churn",
            model_version=1,
            priority="normal",
            request=request,
            meta=None,
            request_hash=None,
            created_at=datetime.now(UTC),
        )

    jobs = [job({"inputs": [ROW]}), job({"inputs": [{**ROW, "plan_tier": "\x00"}]})]
    jobs.append(job({"inputs": [ROW]}))

    async def together() -> list:
        committer = GroupCommitter()
        return await asyncio.gather(*(committer.submit(j) for j in jobs), return_exceptions=True)

    outcomes = asyncio.run(together())
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], JobRejectedError)
    for j in (jobs[0], jobs[2]):
        assert wait_done(client, str(j.id))["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{jobs[1].id}").status_code == 404


def test_a_body_that_is_not_json_or_nested_too_deep_is_refused(stack, client) -> None:
    r = client.post(
        "/v1/jobs", content=b'{"model": "churn"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    deep = b'{"model": "churn", "inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    r = client.post("/v1/jobs", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["detail"]
    nested = {"a": {}}
    for _ in range(60):
        nested = {"a": nested}
    r = submit(client, inputs=[ROW], metadata=nested)
    assert r.status_code == 422 and "Nested more than" in r.json()["detail"][0]["msg"]


# --- API keys --------------------------------------------------------------------------------


def test_unknown_keys_do_not_grow_the_key_cache(stack: Stack) -> None:
    from fastapi import HTTPException
    from starlette.requests import Request

    from api import deps

    deps._key_cache = deps.KeyCache(size=50)

    async def attempt(token: str) -> int:
        request = Request(
            {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
        )
        try:
            await deps._authenticate(request)
        except HTTPException as exc:
            return exc.status_code
        return 200

    async def many() -> list[int]:
        return [await attempt(f"iq_{uuid.uuid4().hex}") for _ in range(200)]

    assert set(asyncio.run(many())) == {401}
    assert len(deps._key_cache) == 50


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.devstack.cli", *args],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_are_listed_and_revoked(stack: Stack) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    created = _cli("keys", "create", "--tenant", tenant, "--name", "ci")
    assert created.returncode == 0, created.stderr
    value = created.stdout.strip().splitlines()[-1]
    listed = _cli("keys", "list")
    line = next(ln for ln in listed.stdout.splitlines() if tenant in ln)
    assert value not in listed.stdout and "revoked=-" in line
    key_id = line.split()[0]
    headers = {"Authorization": f"Bearer {value}"}
    assert httpx.get(stack.api_url + "/v1/jobs", headers=headers).status_code == 200
    assert _cli("keys", "revoke", key_id).returncode == 0
    assert _cli("keys", "revoke", key_id).returncode != 0  # already revoked
    wait_for(
        lambda: httpx.get(stack.api_url + "/v1/jobs", headers=headers).status_code == 401,
        15,
        "the revoked key to be refused",
        step=0.5,
    )


def test_a_short_bootstrap_key_is_refused_in_production() -> None:
    from shared.config import Settings

    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(env="production", flower_password="a-real-secret", bootstrap_api_key="short")
    Settings(env="production", flower_password="a-real-secret", bootstrap_api_key="k" * 32)


# --- callbacks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/hook",  # shared address space (carrier-grade NAT)
        "http://[::ffff:127.0.0.1]/hook",  # loopback, IPv4-mapped
        "http://0.0.0.0/hook",
        "http://192.0.0.1/hook",  # IETF protocol assignments
        "http://224.0.0.1/hook",  # multicast
        "http://10.1.2.3/hook",
    ],
)
def test_callbacks_reach_only_globally_routable_addresses(url: str) -> None:
    with pytest.raises(CallbackRefusedError):
        check_url(url, allow_private=False)


def test_a_callback_goes_to_the_address_that_was_checked(stack, client, monkeypatch) -> None:
    """DNS rebinding: the name answers one address for the check and another after it.
    The delivery must not look the name up again."""
    from workers.tasks.callbacks import callback

    receiver = Receiver([])
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host, *args, **kw):  # type: ignore[no-untyped-def]
        if host != "hooks.rebind.test":
            return real(host, *args, **kw)
        lookups.append(host)
        # First the address that passes the check, then one where nothing listens.
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.9"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://hooks.rebind.test:{port}/hook"
    job_id = record_queued(client, {"inputs": [ROW], "callback_url": url})
    with session_scope() as session:  # ended by hand: its delivery is owed, no message sent
        session.execute(
            text("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = :j"),
            {"j": job_id},
        )
    try:
        assert callback.run(job_id) == "delivered"
        ((headers, body),) = receiver.received
        assert {k.lower(): v for k, v in headers.items()}["host"] == f"hooks.rebind.test:{port}"
        assert body["id"] == job_id
        assert lookups == ["hooks.rebind.test"]  # looked up once, for the check
    finally:
        receiver.close()


# --- secrets ---------------------------------------------------------------------------------


def test_flower_credentials_are_not_on_its_command_line(stack: Stack) -> None:
    from shared.devstack.embedded import free_port

    password = "flower-" + uuid.uuid4().hex
    port = free_port()
    flower = start_process(
        "flower", "flower", "--port", str(port), env={"INFERQ_FLOWER_PASSWORD": password}
    )
    try:
        url = f"http://127.0.0.1:{port}/healthcheck"

        def up() -> bool:
            try:
                return httpx.get(url, auth=("admin", password), timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "Flower to answer", step=0.5)
        page = f"http://127.0.0.1:{port}/api/workers"
        assert httpx.get(page, timeout=10).status_code == 401
        assert httpx.get(page, auth=("admin", password), timeout=10).status_code == 200
        pids = [flower.popen.pid] + [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-g", str(flower.popen.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert password.encode() not in cmdline
    finally:
        flower.stop()


def test_secret_files_are_private_from_their_first_byte(tmp_path: Path) -> None:
    from shared.devstack.supervisor import _secret, _write_private

    old = os.umask(0o022)
    try:
        value = _secret(tmp_path / "dev-api-key", lambda: "iq_secret")
        _write_private(tmp_path / "stack.json", "{}")
    finally:
        os.umask(old)
    assert value == "iq_secret"
    for name in ("dev-api-key", "stack.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_readyz_names_what_failed_without_its_address(stack: Stack) -> None:
    from shared.devstack.embedded import free_port

    port = free_port()
    dead = f"postgresql+psycopg2://inferq:s3cret-pw@127.0.0.1:{port}/inferq"
    api, url = start_api({"INFERQ_DATABASE_URL": dead})
    try:
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503
        check = ready.json()["checks"]["database"]
        assert check["ok"] is False and "database" in check["detail"]
        assert str(port) not in ready.text and "s3cret-pw" not in ready.text
        assert "127.0.0.1" not in ready.text
    finally:
        api.stop()


def test_no_other_tenants_job_is_visible_with_a_fresh_key(stack: Stack, client) -> None:
    job_id = submit(client, inputs=[ROW]).json()["id"]
    with make_client(stack) as other:
        assert other.get(f"/v1/jobs/{job_id}").status_code == 404


# --- tenant-owned feature data ---------------------------------------------------------------


def test_feature_rows_belong_to_their_tenant(stack: Stack, owner: httpx.Client, client) -> None:
    """The demo customers are tenant default's: another tenant can neither read them by id
    (at submit, or from the feature cache a worker warmed for their owner) nor score them."""
    ids = [11, 12, 13]
    mine = wait_done(owner, submit(owner, entity_ids=ids).json()["id"])
    assert mine["status"] == "succeeded"  # the owner's rows are now in the feature cache
    r = submit(client, entity_ids=ids)
    assert r.status_code == 422
    assert {e["loc"][-1] for e in r.json()["detail"]} == {0, 1, 2}
    # A job that reached a worker anyway (recorded without the API's check) finds nothing.
    theirs = record_queued(client, {"entity_ids": ids})
    from tests.test_batching import _send_as_one_batch

    _send_as_one_batch([theirs])
    job = wait_done(client, theirs)
    assert job["status"] == "failed" and job["error"]["code"] == "unknown_entity"
    scored = wait_done(client, submit(client, type="score").json()["id"], timeout=60)
    assert scored["status"] == "succeeded" and scored["result"]["rows_scored"] == 0


def test_readyz_waits_for_a_worker_with_its_models_loaded(stack: Stack) -> None:
    """A worker process is alive (its heartbeat key exists) before it is ready (its value
    says it has loaded the production versions); /readyz waits for ready."""
    from redis import Redis

    from shared.config import get_settings

    prefix = f"iqready{uuid.uuid4().hex[:6]}"
    api, url = start_api({"INFERQ_REDIS_PREFIX": prefix})
    redis = Redis.from_url(get_settings().redis_url)
    try:
        assert httpx.get(url + "/readyz", timeout=30).status_code == 503  # no worker at all
        redis.set(f"{prefix}:worker:host:1", "loading", ex=60)
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["workers"]["ok"] is False
        redis.set(f"{prefix}:worker:host:2", "ready", ex=60)
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert "1 with their models loaded" in ready.json()["checks"]["workers"]["detail"]
    finally:
        api.stop()
        redis.delete(f"{prefix}:worker:host:1", f"{prefix}:worker:host:2")
