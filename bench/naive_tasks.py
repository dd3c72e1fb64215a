"""The naive design's worker, for ``bench.load_bench``: one Celery task per request.

What the tutorials show: Redis as broker *and* result backend, one task per one-row
request, a one-row pandas DataFrame per call, categories mapped with pandas, then the
pipeline's ``predict_proba``. The churn pipeline is read from inferq's registry once per
worker process (the same artifact inferq serves), so both designs run the same model.

    python -m celery -A bench.naive_tasks worker -c 2

Environment: ``BENCH_NAIVE_REDIS_URL`` (broker and results), ``INFERQ_DATABASE_URL`` /
``INFERQ_MODEL_DIR`` (to find the production churn version, once per process).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from typing import Any  # noqa: E402

from celery import Celery  # noqa: E402

REDIS_URL = os.environ.get("BENCH_NAIVE_REDIS_URL", "redis://127.0.0.1:6379/2")

app = Celery("naive", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    broker_connection_retry_on_startup=True,
)

_model: Any = None


def _pipeline() -> Any:
    """The production churn pipeline, loaded once per process from inferq's registry."""
    global _model
    if _model is None:
        from shared.db import session_scope
        from shared.models.registry import ModelCache, production_versions

        with session_scope() as session:
            version = production_versions(session)["churn"]
            _model = ModelCache().get(session, "churn", version)
    return _model


@app.task(name="naive.predict_row")
def predict_row(row: dict[str, Any]) -> float:
    import pandas as pd

    model = _pipeline()
    features = model.schema["features"]
    df = pd.DataFrame([row])
    for spec in features:
        if spec["type"] == "str":
            df[spec["name"]] = pd.Categorical(df[spec["name"]], categories=spec["categories"]).codes
    X = df[[f["name"] for f in features]].to_numpy(dtype="float64")
    return float(model.estimator.predict_proba(X)[0, 1])
