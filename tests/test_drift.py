"""Drift against real servers: traffic drawn like the training data flags nothing; a
shifted feature flags exactly that feature, online and in a score run; the figures reach
/metrics."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd
from sqlalchemy import text

from shared.db import session_scope
from shared.models.catalog import CHURN_SCHEMA
from shared.models.registry import get_version, production_versions
from shared.monitoring.reports import as_dict, online_report
from shared.orm import ModelArtifact
from tests.conftest import Stack, rows_like_training, submit, wait_done


def churn_version() -> int:
    with session_scope() as session:
        return production_versions(session)["churn"]


def predict(client: httpx.Client, version: int, rows: list[dict[str, Any]]) -> None:
    ids = []
    for i in range(0, len(rows), 250):
        r = submit(client, version=version, inputs=rows[i : i + 250])
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for job_id in ids:
        assert wait_done(client, job_id)["status"] == "succeeded"


def online(version: int, since: datetime) -> dict[str, Any]:
    with session_scope() as session:
        mv = get_version(session, "churn", version)
        assert mv is not None and mv.reference_profile, "trained versions carry a profile"
        return as_dict(online_report(session, mv, since=since))


def drifted(report: dict[str, Any]) -> set[str]:
    return {f["feature"] for f in report["features"] if f["drifted"]}


def test_online_traffic_like_the_training_data_flags_nothing_and_a_shift_flags_its_feature(
    stack: Stack, client: httpx.Client
) -> None:
    version = churn_version()

    t0 = datetime.now(UTC)
    predict(client, version, rows_like_training(600, seed=1))
    same = online(version, t0)
    assert same["rows_window"] == 600 and same["enough_rows"]
    assert drifted(same) == set(), same["features"]
    assert not same["drifted"]
    by_name = {f["feature"]: f for f in same["features"]}
    assert by_name["monthly_spend"]["statistic"] == "ks"
    assert by_name["contract_type"]["statistic"] == "chi2"
    assert 0 <= by_name["monthly_spend"]["p_value"] <= 1

    t1 = datetime.now(UTC)
    predict(client, version, rows_like_training(600, seed=2, monthly_spend=lambda s: s * 5))
    spend = online(version, t1)
    assert drifted(spend) == {"monthly_spend"}, spend["features"]
    assert spend["drifted"]

    t2 = datetime.now(UTC)
    predict(client, version, rows_like_training(600, seed=3, contract_type="monthly"))
    contract = online(version, t2)
    assert drifted(contract) == {"contract_type"}, contract["features"]

    # Too few rows to judge: reported, nothing flagged, however shifted.
    t3 = datetime.now(UTC)
    predict(client, version, rows_like_training(50, seed=4, monthly_spend=lambda s: s * 5))
    few = online(version, t3)
    assert few["rows_window"] == 50 and not few["enough_rows"] and drifted(few) == set()

    # The API shows the latest online report; bad requests name what is wrong.
    r = client.get("/v1/models/churn/drift", params={"version": version})
    assert r.status_code == 200, r.text
    assert r.json()["rows_window"] == 50 and r.json()["source"] == "online"
    assert client.get("/v1/models/nope/drift").status_code == 404
    r = client.get("/v1/models/churn/drift", params={"version": 9999})
    assert r.status_code == 404 and "9999" in r.json()["detail"]
    r = client.get("/v1/models/churn/drift", params={"window": "yesterday"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "window"]
    r = client.get("/v1/models/churn/drift", params={"window": str(uuid.uuid4())})
    assert r.status_code == 404


def test_ops_drift_publishes_the_figures_to_metrics(stack: Stack, client: httpx.Client) -> None:
    from workers.app import celery_app

    version = churn_version()
    predict(client, version, rows_like_training(300, seed=5))
    from shared.metrics import drift_key
    from workers.process import redis_client

    redis_client().delete(drift_key())  # only this report's figures count
    celery_app.send_task("ops.drift", queue="ops")
    labels = f'model="churn",statistic="psi",version="{version}"'
    series = f'inferq_feature_drift{{feature="monthly_spend",{labels}}}'
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(stack.api_url + "/metrics", timeout=10).text
        if series in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert series in metrics
    assert (
        f'inferq_feature_drift{{feature="contract_type",model="churn",statistic="chi2",version="{version}"}}'
        in metrics
    )
    assert f'inferq_prediction_drift{{model="churn",statistic="ks",version="{version}"}}' in metrics
    rows = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'inferq_drift_rows{{model="churn",version="{version}"}}')
    ]
    assert rows and float(rows[0].split()[-1]) >= 300


def test_a_score_run_over_a_shifted_table_flags_that_feature(
    stack: Stack, owner: httpx.Client
) -> None:
    from shared.models import registry
    from shared.models.intake import Submission, register_artifact

    table = "userdata.drift_" + uuid.uuid4().hex[:8]  # users' tables live apart
    with session_scope() as session:
        session.execute(text("CREATE SCHEMA IF NOT EXISTS userdata"))
        session.execute(
            text(
                f"CREATE TABLE {table} AS SELECT * FROM customers WHERE id <= 20000"  # noqa: S608
            )
        )
        session.execute(text(f"ALTER TABLE {table} ADD PRIMARY KEY (id)"))
        session.execute(text(f"UPDATE {table} SET monthly_spend = monthly_spend * 5"))
        prod = get_version(session, "churn", production_versions(session)["churn"])
        assert prod is not None
        artifact = session.get(ModelArtifact, prod.sha256)
        assert artifact is not None
        sample = pd.DataFrame(rows_like_training(1000, seed=6))
        declared = {
            k: v
            for k, v in CHURN_SCHEMA.items()
            if k not in ("feature_table", "key", "tenant_column")
        }
        mv = register_artifact(
            session,
            Submission(
                name="churn-moved",
                data=artifact.data,
                fmt="skops",
                kind="classifier",
                schema=declared,
                sample=sample,
                feature_table=table,
                key="id",
                tenant_column="tenant",
                trusted=list(prod.trusted_types),
            ),
        )
        assert mv.reference_profile and mv.reference_profile["rows"] == 1000
        registry.promote(session, name="churn-moved", version=mv.version)
        name, version = mv.name, mv.version

    deadline = time.monotonic() + 10  # the API caches production versions (2 s)
    while (r := submit(owner, type="score", model=name)).status_code == 422:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert r.status_code == 202, r.text
    job = wait_done(owner, r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    link = job["result"]["drift"]
    assert link.endswith(f"/v1/models/{name}/drift?version={version}&window={job['id']}")
    path = link.split("/v1/", 1)[1]
    deadline = time.monotonic() + 20
    while (r := owner.get("/v1/" + path)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["source"] == "score" and report["run_id"] == job["id"]
    assert report["rows_window"] > 10_000 and report["enough_rows"]
    assert drifted(report) == {"monthly_spend"}, report["features"]
    assert report["score"] is not None

    # The same model over its reference's own population flags nothing.
    with session_scope() as session:
        session.execute(text(f"UPDATE {table} SET monthly_spend = monthly_spend / 5"))
    r = submit(owner, type="score", model=name)
    job = wait_done(owner, r.json()["id"], timeout=120)
    deadline = time.monotonic() + 20
    path = job["result"]["drift"].split("/v1/", 1)[1]
    while (r := owner.get("/v1/" + path)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert drifted(r.json()) == set(), r.json()["features"]
    assert np.isfinite(r.json()["score"]["psi"])


def test_inferq_drift_reports_now_prints_a_table_and_publishes(
    stack: Stack, client: httpx.Client
) -> None:
    import subprocess
    import sys

    from shared.metrics import drift_key
    from workers.process import redis_client

    version = churn_version()
    predict(client, version, rows_like_training(250, seed=7))
    redis_client().delete(drift_key())
    cli = [sys.executable, "-m", "shared.devstack.cli", "drift", "churn", "--window", "60"]
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"churn v{version}: ") and "rows in the window" in lines[0]
    assert any(line.split()[:2] == ["monthly_spend", "ks"] for line in lines), shown.stdout
    assert any(line.split()[:2] == ["contract_type", "chi2"] for line in lines), shown.stdout
    assert lines[-1].startswith("drift: ")
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(as_json.stdout)
    assert report["rows_window"] >= 250 and report["source"] == "online"
    metrics = httpx.get(stack.api_url + "/metrics", timeout=10).text
    assert f'inferq_drift_rows{{model="churn",version="{version}"}}' in metrics
    missing = subprocess.run(
        [sys.executable, "-m", "shared.devstack.cli", "drift", "nope"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "nope" in missing.stderr
