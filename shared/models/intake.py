"""Registering a user's own model: an artifact checked, understood and stored, or refused.

``register_artifact`` is what ``POST /v1/models/{name}/versions`` and ``inferq models
register`` both call. Every check runs before anything is written, and each refusal is an
``IntakeError`` naming the field at fault: the format and, for skops files, the types it
would have to trust; that it is a fitted estimator; its kind (scikit-learn's own
``is_classifier`` / ``is_regressor`` / ``is_outlier_detector``, or the declared one); its
input schema (``shared.models.schema_infer.infer``); the feature table; and a trial prediction on
the sample, or on rows built from the schema, through the same code that serves jobs.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.orm import Session

from shared import sql
from shared.models import formats, registry
from shared.models.features import FeatureTable, check_table, quote
from shared.models.registry import LoadedModel
from shared.models.schema import SchemaError, validate_rows
from shared.models.schema_infer import infer
from shared.monitoring.profile import REFERENCE_ROWS, build_profile, columns_of
from shared.orm import ModelVersion
from shared.sql import Statement

__all__ = ["IntakeError", "Submission", "register_artifact", "sample_frame", "KINDS", "NAME"]

KINDS = ("auto", "classifier", "regressor", "anomaly")
#: Model names: they appear in URLs, metrics labels and Redis keys.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Rows of a sample that are kept for the trial prediction.
TRIAL_ROWS = 1000
_NEEDS = {"classifier": "predict_proba", "regressor": "predict", "anomaly": "decision_function"}


class IntakeError(ValueError):
    """A registration refused: ``field`` is what to fix (artifact, kind, schema, ...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass
class Submission:
    """What a data scientist hands over: the artifact's bytes and what inferq cannot
    read from it (all optional)."""

    name: str
    data: bytes
    filename: str | None = None
    fmt: str | None = None
    kind: str = "auto"
    schema: dict[str, Any] | None = None
    sample: pd.DataFrame | None = None
    threshold: float | None = None
    feature_table: str | None = None
    key: str | None = None
    tenant_column: str | None = None
    trusted: list[str] = field(default_factory=list)
    signature: list[dict[str, Any]] | None = None
    source: dict[str, Any] | None = None


def sample_frame(sample: Any) -> pd.DataFrame:
    """A sample as a DataFrame: JSON rows (a list of objects), CSV text or bytes."""
    try:
        if isinstance(sample, list):
            if not sample or not all(isinstance(r, dict) for r in sample):
                raise IntakeError("sample", "give the sample as a non-empty list of row objects")
            return pd.DataFrame(sample)
        if isinstance(sample, str | bytes):
            raw = sample.encode() if isinstance(sample, str) else sample
            frame = pd.read_csv(io.BytesIO(raw))
            if frame.empty:
                raise IntakeError("sample", "the sample has no rows")
            return frame
    except IntakeError:
        raise
    except Exception as exc:
        raise IntakeError("sample", f"could not read the sample: {exc}") from None
    raise IntakeError("sample", "give the sample as JSON rows or CSV")


def _kind(estimator: Any, declared: str) -> str:
    if declared not in KINDS:
        raise IntakeError("kind", f"unknown kind {declared!r}; use one of {', '.join(KINDS)}")
    detected = formats.detect_kind(estimator)
    if declared == "auto":
        if detected is None:
            raise IntakeError(
                "kind",
                f"cannot tell what a {type(estimator).__name__} predicts: declare the kind "
                "(classifier, regressor or anomaly)",
            )
        declared = detected
    elif detected is not None and detected != declared:
        raise IntakeError(
            "kind", f"declared {declared}, but the {type(estimator).__name__} is a {detected}"
        )
    method = _NEEDS[declared]
    if not hasattr(estimator, method):
        raise IntakeError("kind", f"a {declared} needs {method}(); this estimator has none")
    return declared


def _classes(estimator: Any, kind: str, threshold: float | None) -> list[Any] | None:
    if kind != "classifier":
        if threshold is not None:
            raise IntakeError("threshold", "a threshold applies to binary classifiers only")
        return None
    classes = getattr(estimator, "classes_", None)
    if classes is None or len(classes) < 2:
        raise IntakeError("artifact", "the classifier has no classes_ (is it fitted?)")
    values = [c.item() if isinstance(c, np.generic) else c for c in np.asarray(classes).tolist()]
    if not all(isinstance(v, str | int | bool) for v in values):
        raise IntakeError("artifact", f"class labels must be strings or integers, not {values}")
    if threshold is not None:
        if len(values) != 2:
            raise IntakeError("threshold", "a threshold applies to binary classifiers only")
        if not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
            raise IntakeError("threshold", "the threshold must be a number from 0 to 1")
    return values


def _synthetic_rows(schema: dict[str, Any], n: int = 8) -> list[dict[str, Any]]:
    """Valid rows made from the schema, for a trial prediction without a sample."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {}
        for f in schema["features"]:
            if f["type"] == "str":
                cats = f.get("categories") or ["a"]
                row[f["name"]] = cats[i % len(cats)]
            elif f["type"] == "bool":
                row[f["name"]] = bool(i % 2)
            else:
                lo, hi = f.get("min"), f.get("max")
                lo = lo if lo is not None else (0 if hi is None or hi >= 0 else hi - 1)
                hi = hi if hi is not None else lo + 1
                value = lo + (hi - lo) * i / max(1, n - 1)
                row[f["name"]] = round(value) if f["type"] == "int" else float(value)
        rows.append(row)
    return rows


def _sample_rows(
    sample: pd.DataFrame, schema: dict[str, Any], limit: int = TRIAL_ROWS
) -> list[dict[str, Any]]:
    names = [f["name"] for f in schema["features"]]
    part = sample[names].head(limit)
    rows = []
    for rec in part.to_dict("records"):
        rows.append({k: _plain(v) for k, v in rec.items()})
    errors = validate_rows(rows, schema, loc=("sample",))
    if errors:
        where = errors[0]["loc"][1:]  # [row] or [row, column]
        column = f", column {where[1]!r}" if len(where) > 1 else ""
        raise IntakeError("sample", f"sample row {where[0]}{column}: {errors[0]['msg']}")
    return rows


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, Decimal):  # a numeric column read back from a feature table
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _trial(model: LoadedModel, rows: list[dict[str, Any]], from_sample: bool) -> None:
    try:
        out = model.check_rows(rows)
    except Exception as exc:
        what = "the sample" if from_sample else "rows built from its schema (give a sample)"
        raise IntakeError(
            "sample" if from_sample else "schema",
            f"the model could not predict {what}: {type(exc).__name__}: {exc}",
        ) from None
    if len(out.scores) != len(rows) or out.scores.ndim != 1:
        raise IntakeError("artifact", "the model does not give one prediction per row")
    if not np.all(np.isfinite(out.scores)):
        raise IntakeError("artifact", "the model gave NaN or infinite scores on the trial rows")


def _reference(
    session: Session, model: LoadedModel, sample: pd.DataFrame | None
) -> dict[str, Any] | None:
    """The version's reference profile: from the sample given (the user's own training
    data), else from rows of its feature table; None when neither is there (drift is then
    not reported for it)."""
    schema = model.schema
    names = [f["name"] for f in schema["features"]]
    if sample is not None:
        rows = _sample_rows(sample, schema, REFERENCE_ROWS)
        source = f"registration: the sample ({len(rows)} rows)"
    elif schema.get("feature_table"):
        ft = FeatureTable.of(schema)
        assert ft is not None
        pick = Statement(
            "inferq_reference_rows",
            ("bigint",),
            f"SELECT {', '.join(quote(n) for n in names)} FROM {ft.sql_name} "
            "ORDER BY random() LIMIT $1",
            prepare=False,
        )
        found = sql.run(session.connection(), (pick, (REFERENCE_ROWS,)))
        rows = [dict(zip(names, map(_plain, r), strict=True)) for r in found]
        rows = [r for r in rows if not validate_rows([r], schema)]
        source = f"registration: {len(rows)} rows of {schema['feature_table']}"
    else:
        return None
    if not rows:
        return None
    scores = model.predict_rows(rows).scores
    return build_profile(schema, columns_of(rows, names), scores, source=source)


def register_artifact(session: Session, sub: Submission) -> ModelVersion:
    """Check ``sub`` and store it as the next (staging) version of ``sub.name``."""
    if not NAME.match(sub.name):
        raise IntakeError(
            "name", "a model name is 1 to 64 letters, digits, '_', '.' or '-', starting alnum"
        )
    if not sub.data:
        raise IntakeError("artifact", "the artifact is empty")
    try:
        fmt = sub.fmt or formats.detect(sub.data, sub.filename)
        trusted: list[str] = []
        if fmt == "skops":
            untrusted = formats.untrusted_types(sub.data)
            refused = [t for t in untrusted if t not in sub.trusted]
            if refused:
                raise IntakeError(
                    "trusted",
                    "the skops file holds types skops does not trust by default: "
                    f"{', '.join(refused)}; pass them as trusted types if you trust this file",
                )
            trusted = untrusted
        estimator = formats.load(sub.data, fmt, trusted)
        formats.check_estimator(estimator)
    except formats.ArtifactError as exc:
        raise IntakeError("artifact", str(exc)) from None
    kind = _kind(estimator, sub.kind)
    classes = _classes(estimator, kind, sub.threshold)
    declared = dict(sub.schema) if sub.schema is not None else None
    table = sub.feature_table or (declared or {}).get("feature_table")
    key = sub.key or (declared or {}).get("key") or ("id" if table else None)
    owner = sub.tenant_column or (declared or {}).get("tenant_column")
    if declared is not None:
        for extra in ("feature_table", "key", "tenant_column"):
            declared.pop(extra, None)
    try:
        schema = infer(estimator, declared=declared, sample=sub.sample, signature=sub.signature)
    except SchemaError as exc:
        raise IntakeError("schema", str(exc)) from None
    if (key is not None or owner is not None) and table is None:
        raise IntakeError("key" if key else "tenant_column", "this needs a feature table")
    if table is not None:
        problems = check_table(session, table, key or "id", schema["features"], owner)
        if problems:
            raise IntakeError(problems[0][0], "; ".join(m for _, m in problems))
        schema = {**schema, "feature_table": table, "key": key}
        if owner is not None:
            schema["tenant_column"] = owner
    model = LoadedModel(sub.name, 0, kind, schema, sub.threshold, estimator, classes)
    if sub.sample is not None:
        _trial(model, _sample_rows(sub.sample, schema), True)
    else:
        _trial(model, _synthetic_rows(schema), False)
    reference = _reference(session, model, sub.sample)
    source = dict(sub.source or {})
    if sub.filename and "file" not in source:
        source["file"] = sub.filename
    return registry.register(
        session,
        name=sub.name,
        kind=kind,
        data=sub.data,
        fmt=fmt,
        schema=schema,
        threshold=sub.threshold,
        classes=classes,
        trusted=trusted,
        source=source or None,
        reference_profile=reference,
    )
