"""Users' own models: registered from files, promoted, served and scored like the built-ins."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import IsolationForest, RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sqlalchemy import text

from shared.db import get_engine, session_scope
from shared.scoring.partitions import chunk_table_name
from tests.conftest import ROOT, Stack, submit, wait_done
from tests.factories import (
    FEATURES,
    accounts,
    gbt_pipeline,
    joblib_bytes,
    plain_rows,
    skops_bytes,
    unique,
    upload,
)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = accounts(3000, seed=1)
    return frame.iloc[:2500], frame.iloc[2500:]


@pytest.fixture(scope="module")
def gbt(data):
    return gbt_pipeline(data[0])


def _promote(admin: httpx.Client, name: str, version: int) -> None:
    r = admin.post(f"/v1/models/{name}/versions/{version}/promote")
    assert r.status_code == 200, r.text


def _predictions(client: httpx.Client, name: str, rows: list[dict], **extra) -> list[dict]:
    r = submit(client, model=name, inputs=rows, **extra)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"], timeout=60)
    assert job["status"] == "succeeded", job
    return job["result"]["predictions"]


def test_a_dataframe_pipeline_is_served_exactly_as_trained(
    stack: Stack, admin, client, data, gbt
) -> None:
    train, test = data
    name = unique("gbt")
    blob, untrusted = skops_bytes(gbt)
    r = upload(admin, name, blob, sample=plain_rows(train[FEATURES].head(200)), trusted=untrusted)
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["stage"] == "staging" and view["kind"] == "classifier"
    assert view["format"] == "skops" and view["classes"] == [False, True]
    schema = view["input_schema"]
    assert schema["input"] == "frame"
    feats = {f["name"]: f for f in schema["features"]}
    assert list(feats) == FEATURES  # from feature_names_in_
    assert feats["plan"]["type"] == "str" and feats["plan"]["categories"] == sorted(
        ["basic", "plus", "pro"]
    )  # from the fitted OneHotEncoder
    assert feats["age"]["type"] == "int" and feats["income"]["type"] == "float"
    _promote(admin, name, view["version"])

    rows = plain_rows(test[FEATURES].head(500))
    want = gbt.predict_proba(test[FEATURES].head(500))[:, 1].tolist()
    # One job of 500 rows, and 100 one-row jobs at once (batched with each other).
    assert [p["score"] for p in _predictions(client, name, rows)] == want
    with ThreadPoolExecutor(16) as pool:
        singles = list(pool.map(lambda row: _predictions(client, name, [row])[0], rows[:100]))
    assert [p["score"] for p in singles] == want[:100]
    assert [p["label"] for p in singles] == [s >= 0.5 for s in want[:100]]
    # Validated against the inferred schema like any model.
    r = submit(client, model=name, inputs=[{**rows[0], "plan": "platinum"}])
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "inputs", 0, "plan"]


def test_a_numeric_regressor_registered_from_the_command_line(
    stack: Stack, client, tmp_path
) -> None:
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 10, (800, 3))
    y = 2 * X[:, 0] - X[:, 1] + rng.normal(0, 0.1, 800)
    forest = RandomForestRegressor(n_estimators=20, random_state=0).fit(X, y)  # numpy: no names
    artifact = tmp_path / "forest.joblib"
    artifact.write_bytes(joblib_bytes(forest))
    sample = tmp_path / "sample.csv"
    pd.DataFrame(X[:50], columns=["width", "height", "depth"]).to_csv(sample, index=False)
    name = unique("forest")
    out = subprocess.run(
        [sys.executable, "-m", "shared.devstack.cli", "models", "register", name, str(artifact)]
        + ["--sample", str(sample), "--promote"],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"registered {name} v1" in out.stdout
    rows = [{"width": a, "height": b, "depth": c} for a, b, c in X[:40].tolist()]
    got = [p["score"] for p in _predictions(client, name, rows)]
    assert got == forest.predict(X[:40]).tolist()
    assert all(p["label"] is None for p in _predictions(client, name, rows[:2]))


def test_a_multiclass_classifier_gives_the_class_and_every_probability(
    stack: Stack, admin, client
) -> None:
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"spend": rng.uniform(0, 100, 900), "visits": rng.integers(0, 30, 900)})
    tier = np.where(frame["spend"] > 66, "gold", np.where(frame["spend"] > 33, "silver", "bronze"))
    model = LogisticRegression(max_iter=1000).fit(frame, tier)
    name = unique("tier")
    blob, untrusted = skops_bytes(model)
    assert untrusted == []
    r = upload(admin, name, blob, sample=plain_rows(frame.head(20)), promote=True)
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == ["bronze", "gold", "silver"]
    assert r.json()["stage"] == "production"
    rows = plain_rows(frame.tail(60))
    preds = _predictions(client, name, rows)
    proba = model.predict_proba(frame.tail(60))
    assert [p["label"] for p in preds] == model.predict(frame.tail(60)).tolist()
    for p, want in zip(preds, proba.tolist(), strict=True):
        assert p["scores"] == dict(zip(["bronze", "gold", "silver"], want, strict=True))
        assert p["score"] == max(want)
    with session_scope() as session:
        logged = session.execute(
            text("SELECT predicted_class, label FROM prediction_logs WHERE model = :m"),
            {"m": name},
        ).all()
    assert {c for c, _ in logged} <= {"bronze", "gold", "silver"} and len(logged) == 60
    assert all(label is None for _, label in logged)


def test_an_isolation_forest_flags_anomalies(stack: Stack, admin, client) -> None:
    rng = np.random.default_rng(9)
    X = rng.normal(0, 1, (600, 2))
    detector = IsolationForest(n_estimators=50, random_state=1).fit(X)
    name = unique("iforest")
    blob, untrusted = skops_bytes(detector)
    sample = [{"x": a, "y": b} for a, b in X[:30].tolist()]
    r = upload(admin, name, blob, sample=sample, trusted=untrusted, promote=True)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "anomaly"
    probe = np.array([[0.0, 0.1], [8.0, -9.0]])
    preds = _predictions(client, name, [{"x": a, "y": b} for a, b in probe.tolist()])
    assert [p["score"] for p in preds] == (-detector.decision_function(probe)).tolist()
    assert [p["label"] for p in preds] == [False, True]


def _create_table(name: str, frame: pd.DataFrame, *, drop: tuple[str, ...] = ()) -> None:
    """A table of the data team's own, in a schema of its own (outside inferq's)."""
    cols = [c for c in FEATURES if c not in drop]
    types = {"age": "integer", "income": "double precision", "plan": "text", "region": "text"}
    types["tickets"] = "smallint"
    ddl = ", ".join(f"{c} {types[c]} NOT NULL" for c in cols)
    with get_engine().begin() as conn:
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS userdata"))
        conn.execute(text(f"CREATE TABLE {name} (account_id bigint PRIMARY KEY, {ddl})"))
        raw = conn.connection.dbapi_connection
        cur = raw.cursor()
        buf = frame[cols].to_csv(header=False)
        cur.copy_expert(f"COPY {name} (account_id, {', '.join(cols)}) FROM STDIN CSV", _io(buf))


def _io(s: str):
    import io

    return io.StringIO(s)


def _upload_over(admin: httpx.Client, name: str, model, sample: pd.DataFrame, table: str):
    """Register ``model`` as ``name`` over its feature table, promoted."""
    blob, untrusted = skops_bytes(model)
    r = upload(
        admin,
        name,
        blob,
        sample=plain_rows(sample[FEATURES].head(100)),
        trusted=untrusted,
        feature_table=table,
        key="account_id",
        promote=True,
    )
    assert r.status_code == 201, r.text
    return r


def test_a_score_job_over_the_models_own_feature_table(stack: Stack, admin, client, gbt) -> None:
    table = "userdata." + unique("accounts").replace("-", "_")
    frame = accounts(25_000, seed=2)  # three chunks of 10,000 ids
    _create_table(table, frame)
    name = unique("gbt-table")
    r = _upload_over(admin, name, gbt, frame, table)
    assert r.json()["input_schema"]["feature_table"] == table

    r = submit(client, type="score", model=name)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["rows_scored"] == len(frame)
    with session_scope() as session:
        rows = session.execute(
            text("SELECT entity_id, score FROM predictions WHERE run_id = :r ORDER BY entity_id"),
            {"r": job["id"]},
        ).all()
    assert [e for e, _ in rows] == frame.index.tolist()  # exactly one per row
    want = gbt.predict_proba(frame[FEATURES])[:, 1]
    assert np.array_equal(np.array([s for _, s in rows]), want)  # to the last bit

    # A segment over the table's own columns, and entity_ids read from it.
    r = submit(client, type="score", model=name, segment={"plan": "pro", "region": ["east"]})
    seg = wait_done(client, r.json()["id"], timeout=120)
    assert seg["result"]["rows_scored"] == int(
        ((frame["plan"] == "pro") & (frame["region"] == "east")).sum()
    )
    ids = [5, 17, 24_999]
    r = submit(client, model=name, entity_ids=ids)
    job = wait_done(client, r.json()["id"])
    assert [p["entity_id"] for p in job["result"]["predictions"]] == ids
    assert [p["score"] for p in job["result"]["predictions"]] == want[[i - 1 for i in ids]].tolist()
    assert submit(client, model=name, entity_ids=[99_999_999]).status_code == 422
    r = submit(client, type="score", model=name, segment={"id": 3})
    assert r.status_code == 422 and "account_id" in r.text  # the key is the table's own


def test_a_chunk_the_model_cannot_score_fails_its_job_once(stack: Stack, admin, client, data):
    """The model's own error while a chunk is predicted and written: the job fails with it,
    at the first attempt (not retried as a database error), and writes nothing."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    train = data[0]
    pre = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="error"), ["plan", "region"])],
        remainder="passthrough",
    )
    strict = Pipeline([("pre", pre), ("gbt", HistGradientBoostingClassifier(max_iter=10))])
    strict.fit(train[FEATURES], train["churned"])
    table = "userdata." + unique("strict").replace("-", "_")
    _create_table(table, accounts(5_000, seed=4))
    with get_engine().begin() as conn:  # a plan the encoder has never seen
        conn.execute(text(f"UPDATE {table} SET plan = 'platinum' WHERE account_id = 4321"))
    name = unique("strict")
    _upload_over(admin, name, strict, train, table)
    r = submit(client, type="score", model=name)
    assert r.status_code == 202, r.text
    try:
        job = wait_done(client, r.json()["id"], timeout=120)
    finally:  # later tests score every model's table (the nightly run)
        with get_engine().begin() as conn:
            conn.execute(text(f"UPDATE {table} SET plan = 'basic' WHERE account_id = 4321"))
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "prediction_failed", job["error"]
    message = job["error"]["message"]
    assert "ValueError" in message and "unknown categor" in message, message
    assert "COPY" not in message, message  # the model's error, not the write's
    with session_scope() as session:
        attempts = session.execute(
            text("SELECT max(attempts) FROM scoring_chunks WHERE run_id = :r"), {"r": job["id"]}
        ).scalar()
        chunk, done = session.execute(
            text(
                "SELECT chunk, done_at IS NOT NULL FROM scoring_chunks "
                "WHERE run_id = :r AND 4321 BETWEEN lo AND hi"
            ),
            {"r": job["id"]},
        ).one()
        table_left = session.execute(
            text("SELECT to_regclass(:t) IS NOT NULL"),
            {"t": chunk_table_name(uuid.UUID(job["id"]), chunk)},
        ).scalar()
    assert attempts == 1
    assert not done and not table_left  # the failed chunk's table went with its transaction


def test_an_untrusted_skops_type_is_refused_unless_trusted(stack: Stack, admin, data, gbt) -> None:
    name = unique("untrusted")
    blob, untrusted = skops_bytes(gbt)
    assert untrusted  # the boosted trees' predictor type
    r = upload(admin, name, blob, sample=plain_rows(data[0][FEATURES].head(20)))
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "metadata", "trusted"]
    assert all(t in detail["msg"] for t in untrusted)
    assert admin.get(f"/v1/models/{name}").status_code == 404  # nothing registered


def test_an_artifact_changed_after_registration_is_refused_at_load(
    stack: Stack, admin, client
) -> None:
    rng = np.random.default_rng(11)
    detector = IsolationForest(n_estimators=10, random_state=int(rng.integers(1e9))).fit(
        rng.normal(0, 1, (200, 2))
    )
    name = unique("tampered")
    blob, untrusted = skops_bytes(detector)
    r = upload(admin, name, blob, sample=[{"x": 0.0, "y": 0.0}], trusted=untrusted)
    assert r.status_code == 201, r.text
    with session_scope() as session:
        session.execute(
            text("UPDATE model_artifacts SET data = data || '\\x00'::bytea WHERE sha256 = :s"),
            {"s": r.json()["sha256"]},
        )
    r = submit(client, model=name, version=1, inputs=[{"x": 0.0, "y": 0.0}])
    assert r.status_code == 202
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "sha256" in job["error"]["message"]


def test_a_cached_copy_that_no_longer_matches_is_fetched_again(stack: Stack, admin) -> None:
    from shared.models.registry import _cache_path, artifact_bytes, get_version

    with session_scope() as session:
        mv = get_version(session, "churn", 1)
        assert mv is not None
        good = artifact_bytes(session, mv)
        _cache_path(mv.sha256).write_bytes(b"corrupted")
        assert artifact_bytes(session, mv) == good
        assert _cache_path(mv.sha256).read_bytes() == good


# --- bad input: each a 4xx naming the problem, and nothing registered ------------------------


def _refused(admin: httpx.Client, name: str, r: httpx.Response, loc: list, words: str) -> None:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == loc, detail
    assert words in detail["msg"], detail
    assert admin.get(f"/v1/models/{name}").status_code == 404


def test_bad_artifacts_are_refused(stack: Stack, admin, data, gbt) -> None:
    sample = plain_rows(data[0][FEATURES].head(20))
    blob, untrusted = skops_bytes(gbt)
    name = unique("bad")
    art = ["body", "artifact"]
    _refused(admin, name, upload(admin, name, b"hello", filename="notes.txt"), art, "not a model")
    r = upload(admin, name, b"hello", filename="m.skops")
    _refused(admin, name, r, art, "not a readable skops file")
    r = upload(admin, name, blob[: len(blob) // 2], trusted=untrusted)
    _refused(admin, name, r, art, "skops")
    r = upload(admin, name, joblib_bytes(gbt)[:500], filename="m.joblib")
    _refused(admin, name, r, art, "could not load")
    r = upload(admin, name, joblib_bytes({"not": "a model"}), filename="m.pkl")
    _refused(admin, name, r, art, "holds a dict, not a fitted estimator")
    unfitted = joblib_bytes(LogisticRegression())
    _refused(admin, name, upload(admin, name, unfitted, filename="m.pkl"), art, "not fitted")
    # The kind: unknown, or not what the estimator is.
    r = upload(admin, name, blob, sample=sample, trusted=untrusted, kind="ranker")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "metadata", "kind"]
    r = upload(admin, name, blob, sample=sample, trusted=untrusted, kind="regressor")
    _refused(admin, name, r, ["body", "metadata", "kind"], "is a classifier")
    # A schema that disagrees with feature_names_in_.
    schema = {"features": [{"name": n, "type": "float"} for n in ["age", "income", "plan"]]}
    r = upload(admin, name, blob, trusted=untrusted, schema=schema)
    _refused(admin, name, r, ["body", "metadata", "schema"], "missing ['region', 'tickets']")
    # A sample outside a declared bound.
    declared = {
        "features": [
            {"name": "age", "type": "int", "min": 18, "max": 20},
            {"name": "income", "type": "float"},
            {"name": "plan", "type": "str"},
            {"name": "region", "type": "str"},
            {"name": "tickets", "type": "int"},
        ]
    }
    r = upload(admin, name, blob, trusted=untrusted, schema=declared, sample=sample)
    _refused(admin, name, r, ["body", "metadata", "sample"], "column 'age'")
    # A sample that lacks a feature; a feature table that does not exist; a bad name.
    r = upload(admin, name, blob, trusted=untrusted, sample=[{"age": 3}])
    _refused(admin, name, r, ["body", "metadata", "schema"], "lacks the model's features")
    r = upload(admin, name, blob, trusted=untrusted, sample=sample, feature_table="nope_table")
    _refused(admin, name, r, ["body", "metadata", "feature_table"], "no table 'nope_table'")
    r = upload(admin, "bad name!", blob, trusted=untrusted, sample=sample)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"]


def test_a_feature_table_that_lacks_a_feature_column_is_refused(
    stack: Stack, admin, data, gbt
) -> None:
    table = "userdata." + unique("partial").replace("-", "_")
    _create_table(table, accounts(10, seed=4), drop=("region",))
    blob, untrusted = skops_bytes(gbt)
    name = unique("bad")
    r = upload(
        admin,
        name,
        blob,
        trusted=untrusted,
        sample=plain_rows(data[0][FEATURES].head(20)),
        feature_table=table,
        key="account_id",
    )
    _refused(
        admin, name, r, ["body", "metadata", "feature_table"], "lacks the feature column 'region'"
    )


def test_registering_needs_models_admin_and_a_body_under_the_limit(
    stack: Stack, client, gbt
) -> None:
    from tests.conftest import ADMIN_KEY, start_api

    blob, _ = skops_bytes(gbt)
    assert upload(client, unique("x"), blob).status_code == 403
    api, url = start_api({"INFERQ_MAX_ARTIFACT_BYTES": "4096"})
    try:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as small:
            r = upload(small, unique("big"), blob)
            assert r.status_code == 413
            assert "INFERQ_MAX_ARTIFACT_BYTES" in r.json()["detail"]

            def chunks():  # no Content-Length: refused while reading
                yield (
                    b'--xyz\r\nContent-Disposition: form-data; name="artifact"; '
                    b'filename="m.skops"\r\nContent-Type: application/octet-stream\r\n\r\n'
                )
                for _ in range(64):
                    yield b"x" * 1024
                    time.sleep(0.001)

            r = small.post(
                "/v1/models/big/versions",
                content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=xyz"},
            )
            assert r.status_code == 413
    finally:
        api.stop()
