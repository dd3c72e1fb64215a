"""Online inference for a set of predict jobs: one vectorised call per model version.

Jobs pinned to the same (model, version) are built into one model input (one DataFrame for
a pipeline fitted on DataFrames, never one per row) and predicted in one call,
then split back per job. A job whose rows break the call is isolated: the others are
predicted again without it, so one bad job never fails its neighbours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine

from shared.config import get_settings
from shared.db import session_scope
from shared.jobs.fields import JobRow
from shared.metrics import count
from shared.models.encoding import row_key
from shared.models.features import FeatureTable, load_features
from shared.models.formats import ArtifactError
from shared.models.registry import ArtifactIntegrityError, LoadedModel, ModelCache
from shared.models.runtime import Output
from shared.sql import Statement

__all__ = ["Outcome", "run_predict_jobs", "prediction_logs", "PREDICTION_LOGS", "prediction_rows"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a batch of predict jobs produced: results, per-job errors, log rows."""

    results: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    errors: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


def _rows_for(
    jobs: list[JobRow], model: LoadedModel, engine: Engine, cache: Redis, stats: Any, out: Outcome
) -> dict[uuid.UUID, list]:
    """Each job's input rows; entity jobs read their tenant's rows of the model's feature
    table through the cache."""
    ft = FeatureTable.of(model.schema)
    wanted: dict[str, set[int]] = defaultdict(set)
    for j in jobs:
        wanted[j.tenant].update(j.request.get("entity_ids") or ())
    features = {
        tenant: load_features(engine, cache, ft, sorted(ids), tenant=tenant, stats=stats)
        for tenant, ids in wanted.items()
        if ids and ft is not None
    }
    rows: dict[uuid.UUID, list] = {}
    for job in jobs:
        ids = job.request.get("entity_ids")
        if ids is None:
            rows[job.id] = job.request["inputs"]
            continue
        found = features.get(job.tenant, {})
        unknown = [e for e in ids if e not in found]
        if unknown:
            out.errors[job.id] = ("unknown_entity", f"no features for entity ids {unknown[:10]}")
        else:
            rows[job.id] = [found[e] for e in ids]
    return rows


def prediction_rows(output: Output, classes: list[Any] | None = None) -> list[dict[str, Any]]:
    """One result per row, as clients see it: ``score`` and ``label``, and for a
    multi-class model ``scores``, the probability of each of ``classes``."""
    scores = output.scores.tolist()
    if output.labels is None:
        return [{"score": s, "label": None} for s in scores]
    labels = output.labels.tolist()
    if output.proba is None:
        return [{"score": s, "label": bool(b)} for s, b in zip(scores, labels, strict=True)]
    names = [str(c) for c in classes or ()]
    return [
        {"score": s, "label": c, "scores": dict(zip(names, p, strict=True))}
        for s, c, p in zip(scores, labels, output.proba.tolist(), strict=True)
    ]


def _predict(
    model: LoadedModel,
    rows: list[dict[str, Any]],
    cache: Redis,
    stats: Any,
    cache_writes: Any = None,
) -> list[dict[str, Any]]:
    """Predictions for ``rows``: from the prediction cache where present, the rest in one call.

    The cache is content-addressed: sha256 of model, version and the normalised feature
    values (so 12 and 12.0 are one entry), and a promotion, being a new version, never
    meets an entry of the old one. New entries go on ``cache_writes`` (a pipeline on the
    cache that the caller sends) when one is given, else out at once.
    """
    settings = get_settings()
    if settings.prediction_cache_ttl_s <= 0:
        return _fresh(model, rows)
    schema = model.schema
    prefix = f"{model.name}:{model.version}:".encode()
    keys = [
        settings.key("pred", hashlib.sha256(prefix + row_key(r, schema)).hexdigest()) for r in rows
    ]
    try:
        cached = cache.mget(keys)
    except RedisError:  # the cache is an optimisation: without it, every row is a miss
        log.warning("prediction cache unavailable; predicting every row", exc_info=True)
        return _fresh(model, rows)
    preds: list[Any] = [None] * len(rows)
    miss = []
    for i, value in enumerate(cached):
        if value is None:
            miss.append(i)
        else:
            preds[i] = json.loads(value)
    count(stats, "cache", "predictions", "hit", by=len(rows) - len(miss))
    count(stats, "cache", "predictions", "miss", by=len(miss))
    if not miss:
        return preds
    pipe = cache_writes if cache_writes is not None else cache.pipeline(transaction=False)
    fresh = _fresh(model, [rows[i] for i in miss])
    for i, pred in zip(miss, fresh, strict=True):
        preds[i] = pred
        pipe.set(keys[i], json.dumps(pred), ex=settings.prediction_cache_ttl_s)
    if cache_writes is None:
        try:
            pipe.execute()
        except RedisError:
            log.warning("prediction cache unavailable; results not cached", exc_info=True)
    return preds


def _fresh(model: LoadedModel, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return prediction_rows(model.predict_rows(rows), model.classes)


def _record(out: Outcome, job: JobRow, model: LoadedModel, rows: list, preds: list) -> None:
    entity_ids = job.request.get("entity_ids")
    multiclass = model.spec.multiclass
    results = []
    for i, pred in enumerate(preds):
        if entity_ids is not None:
            pred = {**pred, "entity_id": entity_ids[i]}
        results.append(pred)
        out.logs.append(
            {
                "job_id": job.id,
                "row": i,
                "model": model.name,
                "version": model.version,
                "inputs": rows[i],
                "score": pred["score"],
                "label": None if multiclass else pred["label"],
                "predicted_class": str(pred["label"]) if multiclass else None,
            }
        )
    out.results[job.id] = {"predictions": results}


def _model(models: ModelCache, name: str, version: int) -> LoadedModel:
    """The loaded version; only a version this process has not loaded yet reads the registry."""
    model = models.cached(name, version)
    if model is None:
        with session_scope() as session:
            model = models.get(session, name, version)
    return model


def run_predict_jobs(
    engine: Engine,
    redis: Redis,
    models: ModelCache,
    jobs: list[JobRow],
    *,
    cache: Redis | None = None,
    writes: Any = None,
) -> Outcome:
    """Predict ``jobs``; ``cache`` holds the feature and prediction caches (default:
    ``redis``, where the counters always go).

    ``writes``, a pipeline on ``redis`` that the caller sends later: the counters, and the
    new prediction-cache entries when the cache is ``redis`` itself, are queued on it
    instead of costing two round trips of their own before the results can be recorded
    (the draining worker sends them with its next pop)."""
    out = Outcome()
    cache = cache or redis
    if writes is not None:
        _run(engine, cache, writes, models, jobs, out, writes if cache is redis else None)
        return out
    stats = redis.pipeline(transaction=False)
    try:
        _run(engine, cache, stats, models, jobs, out)
    except BaseException:
        # Counters must never replace the error on its way out (a SystemExit from a
        # terminated task, say, turned into a Redis error by a Redis that is down).
        with contextlib.suppress(Exception):
            stats.execute()
        raise
    stats.execute()
    return out


def _run(
    engine: Engine,
    cache: Redis,
    stats: Any,
    models: ModelCache,
    jobs: list[JobRow],
    out: Outcome,
    cache_writes: Any = None,
) -> None:
    groups: dict[tuple[str, int], list[JobRow]] = defaultdict(list)
    for job in jobs:
        groups[(job.model, job.model_version or 0)].append(job)
    for (name, version), jobs_of_version in groups.items():
        try:
            model = _model(models, name, version)
        except (LookupError, ArtifactIntegrityError, ArtifactError, OSError) as exc:
            log.error("model %s v%s unavailable: %s", name, version, exc)
            for job in jobs_of_version:
                out.errors[job.id] = ("model_unavailable", f"{name} v{version}: {exc}")
            continue
        rows = _rows_for(jobs_of_version, model, engine, cache, stats, out)
        group = [j for j in jobs_of_version if j.id in rows]
        if not group:
            continue
        # Capped by rows: a backlog of big jobs becomes several calls, not one huge one.
        cap = get_settings().batch_max_rows
        part: list[JobRow] = []
        size = 0
        for job in group:
            if part and size + len(rows[job.id]) > cap:
                _predict_group(out, model, part, rows, cache, stats, cache_writes)
                part, size = [], 0
            part.append(job)
            size += len(rows[job.id])
        _predict_group(out, model, part, rows, cache, stats, cache_writes)


def _predict_group(
    out: Outcome,
    model: LoadedModel,
    group: list[JobRow],
    rows: dict,
    cache: Redis,
    stats: Any,
    cache_writes: Any = None,
) -> None:
    batch = [r for job in group for r in rows[job.id]]
    try:
        preds = _predict(model, batch, cache, stats, cache_writes)
    except Exception:
        if len(group) == 1:
            job = group[0]
            log.exception("prediction failed", extra={"job_id": str(job.id)})
            out.errors[job.id] = ("prediction_failed", "the model could not score these inputs")
            return
        # Isolate the culprit: each job alone.
        for job in group:
            _predict_group(out, model, [job], rows, cache, stats, cache_writes)
        return
    start = 0
    for job in group:
        n = len(rows[job.id])
        _record(out, job, model, rows[job.id], preds[start : start + n])
        start += n


PREDICTION_LOGS = Statement(
    "inferq_prediction_logs",
    ("uuid[]", "int[]", "text[]", "int[]", "jsonb[]", "float8[]", "boolean[]", "text[]"),
    """INSERT INTO prediction_logs
        (job_id, row, model, version, inputs, score, label, predicted_class)
    SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (job_id, row) DO NOTHING""",
    prepare=True,
)


def prediction_logs(logs: list[dict[str, Any]]) -> tuple[Statement, tuple[list[Any], ...]] | None:
    """The insert of a batch's logs, to be sent with the statement that ends its jobs
    (``shared.jobs.store.settle_batch``); a (job_id, row) an earlier delivery logged is skipped.
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
        [r.get("predicted_class") for r in logs],
    )
