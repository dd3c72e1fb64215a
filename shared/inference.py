"""Online inference for a set of predict jobs: one vectorised call per model version.

Jobs pinned to the same (model, version) are encoded together and predicted in one call,
then split back per job. A job whose rows break the call is isolated: the others are
predicted again without it, so one bad job never fails its neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis import Redis
from sqlalchemy import Engine

from shared.config import get_settings
from shared.db import session_scope
from shared.features import load_features
from shared.inputs import encode_rows
from shared.jobs import JobRow
from shared.metrics import count
from shared.prepared import Statement
from shared.registry import IntegrityError, LoadedModel, ModelCache

__all__ = ["Outcome", "run_predict_jobs", "prediction_logs", "PREDICTION_LOGS"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a batch of predict jobs produced: results, per-job errors, log rows."""

    results: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    errors: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


def _rows_for(
    jobs: list[JobRow], engine: Engine, redis: Redis, out: Outcome
) -> dict[uuid.UUID, list]:
    """Each job's input rows; entity jobs read the feature table through the cache."""
    wanted = sorted({e for j in jobs for e in j.request.get("entity_ids") or []})
    features = load_features(engine, redis, wanted) if wanted else {}
    rows: dict[uuid.UUID, list] = {}
    for job in jobs:
        ids = job.request.get("entity_ids")
        if ids is None:
            rows[job.id] = job.request["inputs"]
            continue
        unknown = [e for e in ids if e not in features]
        if unknown:
            out.errors[job.id] = ("unknown_entity", f"no features for entity ids {unknown[:10]}")
        else:
            rows[job.id] = [features[e] for e in ids]
    return rows


def _predict(
    model: LoadedModel, rows: list[dict[str, Any]], redis: Redis
) -> tuple[np.ndarray, Any]:
    """Scores for ``rows``: from the prediction cache where present, the rest in one call.

    The cache is content-addressed: sha256 of model, version and the encoded feature row
    (so 12 and 12.0 are one entry), and a promotion, being a new version, never meets an
    entry of the old one.
    """
    X = encode_rows(rows, model.schema)
    settings = get_settings()
    if settings.prediction_cache_ttl_s <= 0:
        return model.predict(X)
    prefix = f"{model.name}:{model.version}:".encode()
    keys = [settings.key("pred", hashlib.sha256(prefix + x.tobytes()).hexdigest()) for x in X]
    cached = redis.mget(keys)
    n = len(keys)
    scores = np.empty(n, dtype=np.float64)
    labels = None if model.kind == "regressor" else np.empty(n, dtype=bool)
    miss = []
    for i, value in enumerate(cached):
        if value is None:
            miss.append(i)
            continue
        raw = value if isinstance(value, bytes) else value.encode()
        score, label = raw.split(b"|")
        scores[i] = float(score)
        if labels is not None:
            labels[i] = label == b"1"
    pipe = redis.pipeline(transaction=False)
    count(pipe, "cache", "predictions", "hit", by=n - len(miss))
    count(pipe, "cache", "predictions", "miss", by=len(miss))
    if miss:
        fresh, fresh_labels = model.predict(X[miss])
        scores[miss] = fresh
        if labels is not None:
            labels[miss] = fresh_labels
        for j, i in enumerate(miss):
            flag = "-" if labels is None else str(int(labels[i]))
            pipe.set(keys[i], f"{float(fresh[j])!r}|{flag}", ex=settings.prediction_cache_ttl_s)
    pipe.execute()
    return scores, labels


def _record(
    out: Outcome, job: JobRow, model: LoadedModel, rows: list, scores: Any, labels: Any
) -> None:
    entity_ids = job.request.get("entity_ids")
    preds = []
    for i, score in enumerate(scores.tolist()):
        label = None if labels is None else bool(labels[i])
        pred: dict[str, Any] = {"score": score, "label": label}
        if entity_ids is not None:
            pred["entity_id"] = entity_ids[i]
        preds.append(pred)
        out.logs.append(
            {
                "job_id": job.id,
                "row": i,
                "model": model.name,
                "version": model.version,
                "inputs": rows[i],
                "score": score,
                "label": label,
            }
        )
    out.results[job.id] = {"predictions": preds}


def _model(models: ModelCache, name: str, version: int) -> LoadedModel:
    """The loaded version; only a version this process has not loaded yet reads the registry."""
    model = models.cached(name, version)
    if model is None:
        with session_scope() as session:
            model = models.get(session, name, version)
    return model


def run_predict_jobs(
    engine: Engine, redis: Redis, models: ModelCache, jobs: list[JobRow]
) -> Outcome:
    out = Outcome()
    rows = _rows_for(jobs, engine, redis, out)
    groups: dict[tuple[str, int], list[JobRow]] = defaultdict(list)
    for job in jobs:
        if job.id in rows:
            groups[(job.model, job.model_version or 0)].append(job)
    for (name, version), group in groups.items():
        try:
            model = _model(models, name, version)
        except (LookupError, IntegrityError, OSError) as exc:
            log.error("model %s v%s unavailable: %s", name, version, exc)
            for job in group:
                out.errors[job.id] = ("model_unavailable", f"{name} v{version}: {exc}")
            continue
        # Capped by rows: a backlog of big jobs becomes several calls, not one huge one.
        cap = get_settings().batch_max_rows
        part: list[JobRow] = []
        size = 0
        for job in group:
            if part and size + len(rows[job.id]) > cap:
                _predict_group(out, model, part, rows, redis)
                part, size = [], 0
            part.append(job)
            size += len(rows[job.id])
        _predict_group(out, model, part, rows, redis)
    return out


def _predict_group(
    out: Outcome, model: LoadedModel, group: list[JobRow], rows: dict, redis: Redis
) -> None:
    batch = [r for job in group for r in rows[job.id]]
    try:
        scores, labels = _predict(model, batch, redis)
    except Exception:
        if len(group) == 1:
            job = group[0]
            log.exception("prediction failed", extra={"job_id": str(job.id)})
            out.errors[job.id] = ("prediction_failed", "the model could not score these inputs")
            return
        # Isolate the culprit: each job alone.
        for job in group:
            _predict_group(out, model, [job], rows, redis)
        return
    start = 0
    for job in group:
        n = len(rows[job.id])
        end = start + n
        _record(
            out,
            job,
            model,
            rows[job.id],
            scores[start:end],
            None if labels is None else labels[start:end],
        )
        start = end


PREDICTION_LOGS = Statement(
    "inferq_prediction_logs",
    ("uuid[]", "int[]", "text[]", "int[]", "jsonb[]", "float8[]", "boolean[]"),
    """INSERT INTO prediction_logs (job_id, row, model, version, inputs, score, label)
    SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (job_id, row) DO NOTHING""",
    prepare=True,
)


def prediction_logs(logs: list[dict[str, Any]]) -> tuple[Statement, tuple[list[Any], ...]] | None:
    """The insert of a batch's logs, to be sent with the statement that ends its jobs
    (``shared.jobs.settle_batch``); a (job_id, row) an earlier delivery logged is skipped.
    None when there is nothing to log."""
    if not logs:
        return None
    keys = ("row", "model", "version")
    columns = ([str(r["job_id"]) for r in logs], *([r[k] for r in logs] for k in keys))
    return PREDICTION_LOGS, (
        *columns,
        [json.dumps(r["inputs"]) for r in logs],
        [r["score"] for r in logs],
        [r["label"] for r in logs],
    )
