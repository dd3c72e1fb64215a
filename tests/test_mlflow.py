"""Models from a real MLflow server: imported by URI, and followed by alias."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sqlalchemy import create_engine, make_url, text

from tests.conftest import ROOT, Stack, start_process, submit, wait_done, wait_for
from tests.factories import FEATURES, accounts, plain_rows, unique, upload
from tests.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def tracking_uri(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server``: backend store in a database of the test PostgreSQL,
    artifacts on local disk, on the port every inferq process was told about."""
    url = make_url(os.environ["INFERQ_DATABASE_URL"])
    database = f"mlflow_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    port = int(os.environ["INFERQ_MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    backend = url.set(database=database).render_as_string(hide_password=False)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), backend, port=port)
    uri = server.start()
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        server.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def _pipeline(C: float) -> Pipeline:
    frame = accounts(2000, seed=7)
    pre = ColumnTransformer(
        [
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"]),
            ("num", StandardScaler(), ["age", "income", "tickets"]),
        ]
    )
    model = Pipeline([("pre", pre), ("lr", LogisticRegression(C=C, max_iter=500))])
    return model.fit(frame[FEATURES], frame["churned"])


def _log(name: str, model: Pipeline, **kw) -> str:
    example = accounts(5, seed=8)[FEATURES]
    info = mlflow.sklearn.log_model(
        model, name="model", registered_model_name=name, input_example=example, **kw
    )
    return str(info.registered_model_version)


def _served(client: httpx.Client, name: str, rows: list[dict]) -> tuple[int, list[float]]:
    r = submit(client, model=name, inputs=rows)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job["model_version"], [p["score"] for p in job["result"]["predictions"]]


def test_an_mlflow_model_is_imported_by_uri(stack: Stack, tracking_uri: str, admin, client) -> None:
    name = unique("mlf")
    model = _pipeline(1.0)
    assert _log(name, model) == "1"  # MLflow's default: a skops file
    r = upload(admin, name, None, uri=f"models:/{name}/1", promote=True)
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["format"] == "skops" and view["source"]["mlflow_version"] == "1"
    assert [f["name"] for f in view["input_schema"]["features"]] == FEATURES
    rows = plain_rows(accounts(50, seed=9)[FEATURES])
    _, scores = _served(client, name, rows)
    assert scores == model.predict_proba(accounts(50, seed=9)[FEATURES])[:, 1].tolist()
    # A URI that does not resolve: a 422 naming it, and nothing registered.
    r = upload(admin, unique("mlf"), None, uri=f"models:/{name}@nowhere")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "metadata", "uri"]
    assert "nowhere" in r.json()["detail"][0]["msg"]


def test_a_followed_alias_moves_production_in_running_workers(
    stack: Stack, tracking_uri: str, admin, client, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name = unique("follow")
    first, second = _pipeline(1.0), _pipeline(0.001)
    registry = MlflowClient(tracking_uri)
    registry.set_registered_model_alias(name, "champion", _log(name, first))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.devstack.cli",
            "models",
            "follow",
            name,
            f"models:/{name}@champion",
        ],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "v1 is production" in out.stdout
    rows = plain_rows(accounts(20, seed=10)[FEATURES])
    frame = accounts(20, seed=10)[FEATURES]
    assert _served(client, name, rows) == (1, first.predict_proba(frame)[:, 1].tolist())

    poll = 2.0
    beat = start_process("beat", "beat", env={"INFERQ_MLFLOW_POLL_S": str(poll)})
    try:
        # A new version, logged as cloudpickle this time, and the alias moved to it.
        version = _log(name, second, serialization_format="cloudpickle")
        registry.set_registered_model_alias(name, "champion", version)
        moved = time.monotonic()
        want = (2, second.predict_proba(frame)[:, 1].tolist())
        wait_for(lambda: _served(client, name, rows) == want, poll + 10, "the moved alias")
        elapsed = time.monotonic() - moved
    finally:
        beat.stop()
    assert elapsed <= poll + 10
    r = admin.get(f"/v1/models/{name}").json()
    assert r["production_version"] == 2
    assert [v["source"]["mlflow_version"] for v in r["versions"]] == ["1", version]
    assert r["versions"][1]["format"] == "pickle"
    # Every worker process preloaded the new version, so no job paid for the load.
    wait_for(
        lambda: f"'{name}', 2" in stack.worker.log.read_text(errors="replace"),
        10,
        "a worker to preload the new version",
    )
