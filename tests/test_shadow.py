"""Shadow versions against real workers: the sampled share of production jobs is also
scored by the shadow, exactly as that version scores alone, and clients never see it."""

from __future__ import annotations

import math
import time
import uuid

import httpx
from sqlalchemy import select

from shared.db import session_scope
from shared.models.registry import ModelCache, production_versions
from shared.models.training import train
from shared.monitoring.shadow import sampled
from shared.orm import PredictionLog, ShadowPrediction
from tests.conftest import Stack, rows_like_training, submit, wait_done

RATE = 0.5
JOBS = 200


def test_a_shadow_version_scores_the_sampled_share_and_is_never_returned(
    stack: Stack, client: httpx.Client, admin: httpx.Client
) -> None:
    with session_scope() as session:
        prod = production_versions(session)["churn"]
        staging = train(session, "churn", promote="never")["version"]
    assert staging != prod

    # Bad requests name what is wrong.
    r = admin.put("/v1/models/churn/shadow", json={"version": prod, "sample_rate": RATE})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "version"]
    for rate in (0, 1.5, -0.1):
        r = admin.put("/v1/models/churn/shadow", json={"version": staging, "sample_rate": rate})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sample_rate"]
    r = admin.put("/v1/models/churn/shadow", json={"version": 9999, "sample_rate": RATE})
    assert r.status_code == 404 and "9999" in r.json()["detail"]
    assert (
        admin.put("/v1/models/nope/shadow", json={"version": 1, "sample_rate": 1}).status_code
        == 404
    )
    r = client.put("/v1/models/churn/shadow", json={"version": staging, "sample_rate": RATE})
    assert r.status_code == 403  # models:admin only
    assert client.get("/v1/models/churn/shadow").status_code == 404  # none yet

    r = admin.put("/v1/models/churn/shadow", json={"version": staging, "sample_rate": RATE})
    assert r.status_code == 200, r.text
    assert r.json()["rows_compared"] == 0 and r.json()["version"] == staging
    time.sleep(1.5)  # workers read the shadows every INFERQ_MODEL_POLL_S (1 s here)

    rows = rows_like_training(JOBS, seed=11)
    ids = []
    for row in rows:
        r = submit(client, inputs=[row])
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    jobs = [wait_done(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Clients get production's answer, one prediction a row, never the shadow's.
    models = ModelCache()
    with session_scope() as session:
        production = models.get(session, "churn", prod)
        shadow = models.get(session, "churn", staging)
    want = production.predict_rows(rows).scores.tolist()
    assert [j["model_version"] for j in jobs] == [prod] * JOBS
    assert [j["result"]["predictions"][0]["score"] for j in jobs] == want

    expected = sum(sampled(uuid.UUID(i), RATE) for i in ids)
    assert abs(expected - JOBS * RATE) <= 4 * math.sqrt(JOBS * RATE * (1 - RATE))
    deadline = time.monotonic() + 20
    while True:
        report = client.get("/v1/models/churn/shadow").json()
        if report["rows_compared"] >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["rows_compared"] == expected  # exactly the sampled jobs, once each
    assert 0 <= report["label_agreement"] <= 1
    assert report["mean_abs_score_diff"] <= report["p99_abs_score_diff"]
    assert set(report["drift"]) == {"shadow", "production"}

    # Each shadow row is what the shadow version predicts alone, beside production's.
    with session_scope() as session:
        logged = session.execute(
            select(ShadowPrediction, PredictionLog.inputs)
            .join(
                PredictionLog,
                (PredictionLog.job_id == ShadowPrediction.job_id)
                & (PredictionLog.row == ShadowPrediction.row),
            )
            .where(ShadowPrediction.job_id.in_([uuid.UUID(i) for i in ids]))
        ).all()
    assert {str(sp.job_id) for sp, _ in logged} == {i for i in ids if sampled(uuid.UUID(i), RATE)}
    alone = shadow.predict_rows([inputs for _, inputs in logged]).scores.tolist()
    assert [sp.score for sp, _ in logged] == alone
    by_job = {i: j["result"]["predictions"][0]["score"] for i, j in zip(ids, jobs, strict=True)}
    assert all(sp.production_score == by_job[str(sp.job_id)] for sp, _ in logged)

    assert admin.delete("/v1/models/churn/shadow").status_code == 204
    assert client.get("/v1/models/churn/shadow").status_code == 404
    assert admin.delete("/v1/models/churn/shadow").status_code == 404
