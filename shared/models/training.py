"""Training new versions of the built-in models, and the promotion policy."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from shared import sql
from shared.models import registry
from shared.models.catalog import SPECS, ModelSpec, build_pipeline, evaluate, split
from shared.models.encoding import encode_rows
from shared.monitoring.profile import REFERENCE_ROWS, build_profile, columns_from_codes
from shared.sql import Statement

__all__ = ["train", "PROMOTE_POLICIES", "NotEnoughDataError"]

log = logging.getLogger(__name__)
PROMOTE_POLICIES = ("never", "if_better", "always")
#: Labelled rows a table-trained model needs at least.
MIN_ROWS = 200


class NotEnoughDataError(ValueError):
    """The feature table holds too few labelled rows to train on."""


def _table_data(
    session: Session, spec: ModelSpec, max_rows: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Features and labels from the spec's feature table (its ``label`` column): the
    newest ``max_rows`` (highest keys), so rows added since the last version count."""
    schema = spec.schema
    table, key, label = schema["feature_table"], schema["key"], spec.label
    names = [f["name"] for f in schema["features"]]
    cols = ", ".join(f'"{n}"' for n in names)
    newest = Statement(
        "inferq_training_rows",
        ("bigint",),
        f'SELECT {cols}, "{label}" AS label, updated_at FROM "{table}" '
        f'WHERE "{label}" IS NOT NULL ORDER BY "{key}" DESC LIMIT $1',
        prepare=False,
    )
    fields = [*names, "label", "updated_at"]
    found = sql.run(session.connection(), (newest, (max_rows,)))
    rows = [dict(zip(fields, r, strict=True)) for r in found]
    if len(rows) < MIN_ROWS:
        raise NotEnoughDataError(
            f"{spec.name} needs at least {MIN_ROWS} labelled rows in {table}, found {len(rows)}; "
            "run `inferq seed --customers N`"
        )
    X = encode_rows(rows, schema)
    y = np.fromiter((r["label"] for r in rows), dtype=np.int8, count=len(rows))
    stamps = [r["updated_at"] for r in rows]
    window = {"rows": len(rows), "from": min(stamps).isoformat(), "to": max(stamps).isoformat()}
    return X, y, window


def _reference(spec: ModelSpec, pipeline: Any, X: np.ndarray) -> dict[str, Any]:
    """The reference profile of the held-out rows and the fitted pipeline's scores on them."""
    classes = getattr(pipeline, "classes_", None)
    model = registry.LoadedModel(
        spec.name,
        0,
        spec.kind,
        spec.schema,
        spec.threshold,
        pipeline,
        [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else None,
    )
    scores = model.predict(X).scores
    columns = columns_from_codes(spec.schema, X)
    return build_profile(spec.schema, columns, scores, source="training: held-out rows")


def train(
    session: Session, name: str, *, promote: str = "if_better", max_rows: int = 200_000
) -> dict[str, Any]:
    """Fit, evaluate on a held-out split, register; promote per policy. Returns the job result."""
    if promote not in PROMOTE_POLICIES:
        raise ValueError(f"promote must be one of {PROMOTE_POLICIES}")
    spec = SPECS[name]
    if spec.label is not None:
        X, y, window = _table_data(session, spec, max_rows)
    else:
        assert spec.synthetic is not None
        X, y = spec.synthetic(20_000, 7)
        window = {"rows": len(X), "synthetic": True, "at": datetime.now(UTC).isoformat()}
    X_train, X_val, y_train, y_val = split(X, y)
    pipeline = build_pipeline(spec.schema, spec.estimator())
    pipeline.fit(X_train, y_train)
    metrics = evaluate(spec.kind, pipeline, X_val, y_val)
    reference = _reference(spec, pipeline, X_val[:REFERENCE_ROWS])
    mv = registry.register_estimator(
        session,
        estimator=pipeline,
        name=name,
        kind=spec.kind,
        schema=spec.schema,
        metrics=metrics,
        threshold=spec.threshold,
        source={"trained_by": "inferq"},
        training_window=window,
        reference_profile=reference,
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
