"""/metrics after known work: the numbers a Grafana panel shows add up."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROW, Stack, make_client, submit, wait_done


def _samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(stack.api_url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_was_done(stack: Stack) -> None:
    with make_client(stack, tenant="default") as c:
        before = _samples(stack)
        scores = []
        for n in (1, 2, 3):
            r = submit(c, inputs=[ROW] * n)
            assert r.status_code == 202, r.text
            job = wait_done(c, r.json()["id"])
            assert job["status"] == "succeeded"
            scores += [p["score"] for p in job["result"]["predictions"]]
        r = submit(c, type="score", segment={"id": list(range(1, 151))})
        score_job = wait_done(c, r.json()["id"], timeout=60)
        assert score_job["status"] == "succeeded"
        version = str(score_job["model_version"])
        after = _samples(stack)

    jobs = "inferq_jobs_total"
    assert _delta(before, after, jobs, type="predict", status="succeeded", model="churn") == 3
    assert _delta(before, after, jobs, type="score", status="succeeded", model="churn") == 1
    preds = "inferq_predictions_total"
    assert _delta(before, after, preds, model="churn", version=version, source="online") == 6
    assert _delta(before, after, preds, model="churn", version=version, source="score") == 150
    # The histogram of served scores: its count and its sum move with what was served.
    assert _delta(before, after, "inferq_prediction_score_count", model="churn") == 6
    assert _delta(before, after, "inferq_prediction_score_sum", model="churn") == pytest.approx(
        sum(scores)
    )
    runs = "inferq_job_run_seconds_count"
    assert _delta(before, after, runs, type="predict", model="churn") == 3
    assert _delta(before, after, runs, type="score", model="churn") == 1
    assert _delta(before, after, "inferq_job_run_seconds_sum", type="score", model="churn") > 0
