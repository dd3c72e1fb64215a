"""Training new model versions and the promotion policy."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared import registry
from shared.catalog import SPECS, build_pipeline, evaluate, split, synthetic_training_data
from shared.features import CUSTOMER_COLUMNS
from shared.inputs import encode_rows

__all__ = ["train", "PROMOTE_POLICIES", "NotEnoughDataError"]

log = logging.getLogger(__name__)
PROMOTE_POLICIES = ("never", "if_better", "always")


class NotEnoughDataError(ValueError):
    """The feature table holds too few labelled rows to train on."""


def _churn_data(session: Session, max_rows: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    cols = ", ".join(CUSTOMER_COLUMNS)
    rows = (
        session.execute(
            text(
                f"SELECT {cols}, churned, updated_at FROM customers "
                "WHERE churned IS NOT NULL ORDER BY id LIMIT :n"
            ),
            {"n": max_rows},
        )
        .mappings()
        .all()
    )
    if len(rows) < 200:
        raise NotEnoughDataError(
            f"churn needs at least 200 labelled customers, found {len(rows)}; "
            "run `inferq seed --customers N`"
        )
    X = encode_rows([dict(r) for r in rows], SPECS["churn"].schema)
    y = np.fromiter((r["churned"] for r in rows), dtype=np.int8, count=len(rows))
    stamps = [r["updated_at"] for r in rows]
    window = {"rows": len(rows), "from": min(stamps).isoformat(), "to": max(stamps).isoformat()}
    return X, y, window


def train(
    session: Session, name: str, *, promote: str = "if_better", max_rows: int = 200_000
) -> dict[str, Any]:
    """Fit, evaluate on a held-out split, register; promote per policy. Returns the job result."""
    if promote not in PROMOTE_POLICIES:
        raise ValueError(f"promote must be one of {PROMOTE_POLICIES}")
    spec = SPECS[name]
    if name == "churn":
        X, y, window = _churn_data(session, max_rows)
    else:
        X, y = synthetic_training_data(name)
        window = {"rows": len(X), "synthetic": True, "at": datetime.now(UTC).isoformat()}
    X_train, X_val, y_train, y_val = split(X, y)
    pipeline = build_pipeline(spec.schema, spec.estimator())
    pipeline.fit(X_train, y_train)
    metrics = evaluate(spec.kind, pipeline, X_val, y_val)
    mv = registry.register(
        session,
        name=name,
        kind=spec.kind,
        estimator=pipeline,
        schema=spec.schema,
        metrics=metrics,
        threshold=spec.threshold,
        training_window=window,
    )
    current = registry.production_versions(session).get(name)
    promoted = False
    if promote == "always" or current is None and promote == "if_better":
        promoted = True
    elif promote == "if_better" and current is not None and spec.kind != "anomaly":
        # Anomaly detectors have no labels to compare on: promote them explicitly.
        prod = registry.get_version(session, name, current)
        key = next(iter(metrics))
        promoted = prod is None or metrics[key] > prod.metrics.get(key, float("-inf"))
    if promoted:
        registry.promote(session, name=name, version=mv.version)
    log.info("trained %s v%s metrics=%s promoted=%s", name, mv.version, metrics, promoted)
    return {"model": name, "version": mv.version, "metrics": metrics, "promoted": promoted}
