"""The built-in demo models: their input schemas, training data and pipelines.

Three kinds show the service at work: ``churn`` (classifier, trained on the ``customers``
table), ``demand`` (regressor) and ``anomaly`` (IsolationForest), the last two on synthetic
data generated here. Once trained they are ordinary registered versions: nothing outside
this module and ``shared.models.training`` knows their names. Their pipelines take the
``codes`` input (``shared.models.schema``: categories as indices), so inference needs no
DataFrame and onnxruntime can run them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, r2_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

__all__ = [
    "ModelSpec",
    "SPECS",
    "CHURN_SCHEMA",
    "CHURN_EXAMPLE_ROW",
    "KINDS",
    "build_pipeline",
    "evaluate",
    "split",
]

KINDS = ("classifier", "regressor", "anomaly")

CHURN_SCHEMA: dict[str, Any] = {
    "input": "codes",
    "feature_table": "customers",
    "key": "id",
    # The demo's customers belong to tenant `default`: no other tenant reads or scores them.
    "tenant_column": "tenant",
    "features": [
        {"name": "tenure_months", "type": "int", "min": 1, "max": 120},
        {"name": "monthly_spend", "type": "float", "min": 0, "max": 100_000},
        {"name": "support_tickets", "type": "int", "min": 0, "max": 50},
        {"name": "feature_usage_pct", "type": "float", "min": 0, "max": 1},
        {"name": "last_login_days_ago", "type": "int", "min": 0, "max": 365},
        {"name": "num_integrations", "type": "int", "min": 0, "max": 50},
        {"name": "contract_type", "type": "str", "categories": ["monthly", "annual", "multi-year"]},
        {"name": "plan_tier", "type": "str", "categories": ["starter", "growth", "enterprise"]},
        {"name": "is_enterprise", "type": "int", "min": 0, "max": 1},
    ],
}

#: One valid churn row: the example of /docs, the README and the tests.
CHURN_EXAMPLE_ROW: dict[str, Any] = {
    "tenure_months": 12,
    "monthly_spend": 99.0,
    "support_tickets": 2,
    "feature_usage_pct": 0.4,
    "last_login_days_ago": 7,
    "num_integrations": 3,
    "contract_type": "annual",
    "plan_tier": "growth",
    "is_enterprise": 0,
}

DEMAND_SCHEMA: dict[str, Any] = {
    "input": "codes",
    "features": [
        {"name": "price", "type": "float", "min": 0.01, "max": 10_000},
        {"name": "promo", "type": "int", "min": 0, "max": 1},
        {"name": "day_of_week", "type": "int", "min": 0, "max": 6},
        {"name": "temperature_c", "type": "float", "min": -50, "max": 60},
        {"name": "store_size", "type": "str", "categories": ["small", "medium", "large"]},
    ],
}

ANOMALY_SCHEMA: dict[str, Any] = {
    "input": "codes",
    "features": [
        {"name": "amount", "type": "float", "min": 0, "max": 1_000_000},
        {"name": "hour", "type": "int", "min": 0, "max": 23},
        {"name": "distance_km", "type": "float", "min": 0, "max": 20_000},
        {"name": "channel", "type": "str", "categories": ["web", "app", "pos"]},
    ],
}


def build_pipeline(schema: dict[str, Any], estimator: Any) -> Pipeline:
    """Scale numeric columns, one-hot the category codes, then ``estimator``."""
    feats = schema["features"]
    num = [j for j, f in enumerate(feats) if f["type"] != "str"]
    cat = [j for j, f in enumerate(feats) if f["type"] == "str"]
    cats = [list(range(len(feats[j]["categories"]))) for j in cat]
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), num),
            ("cat", OneHotEncoder(categories=cats, handle_unknown="ignore"), cat),
        ],
        sparse_threshold=0.0,
    )
    return Pipeline([("pre", pre), ("model", estimator)])


def evaluate(
    kind: str, pipeline: Pipeline, X: np.ndarray, y: np.ndarray | None
) -> dict[str, float]:
    """Validation metrics; the first key is the one ``promote=if_better`` compares."""
    if kind == "classifier":
        assert y is not None
        p = pipeline.predict_proba(X)[:, 1]
        return {
            "auc": float(roc_auc_score(y, p)),
            "accuracy": float(accuracy_score(y, p >= 0.5)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
        }
    if kind == "regressor":
        assert y is not None
        pred = pipeline.predict(X)
        return {"r2": float(r2_score(y, pred)), "mae": float(mean_absolute_error(y, pred))}
    flagged = pipeline.predict(X) == -1
    return {"flag_rate": float(flagged.mean())}


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: its kind, input schema, estimator factory and decision threshold.

    It learns from its feature table's ``label`` column where it names one, else from
    ``synthetic(n, seed)``: (X, y or None) in the codes encoding.
    """

    name: str
    kind: str
    schema: dict[str, Any]
    estimator: Callable[[], Any]
    threshold: float | None = None
    label: str | None = None
    synthetic: Callable[[int, int], tuple[Any, Any]] | None = None


def _synthetic_demand(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    price = rng.uniform(1, 100, n)
    promo = rng.integers(0, 2, n)
    dow = rng.integers(0, 7, n)
    temp = rng.normal(15, 10, n)
    size = rng.integers(0, 3, n)
    units = (
        200
        - 1.5 * price
        + 40 * promo
        + 15 * (dow >= 5)
        + 0.8 * temp
        + 60 * size
        + rng.normal(0, 10, n)
    )
    X = np.column_stack([price, promo, dow, temp, size]).astype(np.float64)
    return X, np.maximum(units, 0)


def _synthetic_transactions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.5, 0.8, n)
    hour = rng.integers(7, 23, n)
    dist = rng.exponential(5, n)
    channel = rng.integers(0, 3, n)
    k = n // 50  # 2% outliers: large, at night, far away
    amount[:k] *= rng.uniform(20, 80, k)
    hour[:k] = rng.integers(0, 5, k)
    dist[:k] += rng.uniform(500, 5000, k)
    return np.column_stack([amount, hour, dist, channel]).astype(np.float64)


SPECS: dict[str, ModelSpec] = {
    "churn": ModelSpec(
        "churn",
        "classifier",
        CHURN_SCHEMA,
        lambda: LogisticRegression(max_iter=500, C=1.0),
        threshold=0.5,
        label="churned",
    ),
    "demand": ModelSpec(
        "demand", "regressor", DEMAND_SCHEMA, lambda: Ridge(alpha=1.0), synthetic=_synthetic_demand
    ),
    "anomaly": ModelSpec(
        "anomaly",
        "anomaly",
        ANOMALY_SCHEMA,
        lambda: IsolationForest(n_estimators=100, contamination=0.02, random_state=0),
        synthetic=lambda n, seed: (_synthetic_transactions(n, seed), None),
    ),
}


def split(X: np.ndarray, y: np.ndarray | None, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    if y is None:
        a, b = train_test_split(X, test_size=0.2, random_state=seed)
        return a, b, None, None
    stratify = y if len(np.unique(y)) == 2 else None
    return train_test_split(X, y, test_size=0.2, random_state=seed, stratify=stratify)
