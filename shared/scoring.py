"""Population scoring: every entity of a segment of a model's feature table, read from and
written back to Postgres.

A run is planned once into id-range chunks (stored in ``scoring_chunks``), and the chunks
are shared by every worker process on every machine. A chunk streams its rows out with a
binary COPY, predicts them in one call, and COPYs the scores back in the same transaction
that marks it done, holding the chunk's row lock: a chunk delivered twice writes once. The
chunk that completes the run finalizes it.
"""

from __future__ import annotations

import io
import logging
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared import pgcopy
from shared.features import FeatureTable, quote
from shared.jobs import JobStatus
from shared.models.registry import LoadedModel, get_version
from shared.models.schema import check_value, model_input
from shared.orm import Job, ScoringChunk, ScoringRun

__all__ = [
    "HIST_BINS",
    "validate_segment",
    "plan",
    "score_chunk",
    "finalize",
    "ChunkOutcome",
    "latest_score",
    "partition_name",
    "ensure_partition",
    "drop_partition",
]

log = logging.getLogger(__name__)

HIST_BINS = 10
MAX_SEGMENT_VALUES = 1000


def validate_segment(segment: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Equality or IN filters on declared columns only; each problem names its field."""
    specs = {f["name"]: f for f in schema["features"]}
    key = schema.get("key") or "id"
    specs[key] = {"name": key, "type": "int"}
    errors: list[dict[str, Any]] = []
    for name, value in segment.items():
        loc = ["body", "segment", name]
        spec = specs.get(name)
        if spec is None:
            errors.append(
                {
                    "type": "extra_forbidden",
                    "loc": loc,
                    "input": name,
                    "msg": f"not a filterable column; use one of {sorted(specs)}",
                }
            )
            continue
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > MAX_SEGMENT_VALUES:
            errors.append(
                {
                    "type": "too_long",
                    "loc": loc,
                    "input": None,
                    "msg": f"give 1 to {MAX_SEGMENT_VALUES} values",
                }
            )
            continue
        for i, v in enumerate(values):
            problem = check_value(v, spec)
            if problem is not None:
                where = [*loc, i] if isinstance(value, list) else loc
                errors.append(
                    {
                        "type": problem[0],
                        "loc": where,
                        "msg": problem[1],
                        "input": v if not isinstance(v, float) or math.isfinite(v) else str(v),
                    }
                )
    return errors


def _where(segment: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """SQL for a validated segment: column names are from the schema, values are bound."""
    parts, params = [], {}
    for i, (name, value) in enumerate(sorted(segment.items())):
        col = quote(name).replace("%", "%%")  # the text goes through mogrify
        if isinstance(value, list):
            parts.append(f"{col} = ANY(%(s{i})s)")
        else:
            parts.append(f"{col} = %(s{i})s")
        params[f"s{i}"] = value
    return " AND ".join(parts) or "TRUE", params


def _binary_readable(schema: dict[str, Any]) -> bool:
    """Whether every feature reads as float8 (numbers, booleans, categories as codes)."""
    return all(f["type"] != "str" or f.get("categories") for f in schema["features"])


def _select_features(schema: dict[str, Any]) -> str:
    """Every feature as float8: NULL as NaN, booleans as 0/1, categories as their index in
    the schema (-1 if unknown or NULL)."""
    cols = []
    for f in schema["features"]:
        col = quote(f["name"])
        if f["type"] == "str":
            cats = ",".join("'" + c.replace("'", "''") + "'" for c in f["categories"])
            cols.append(
                f"COALESCE(array_position(ARRAY[{cats}]::text[], {col}::text) - 1, -1)::float8"
            )
        elif f["type"] == "bool":
            cols.append(f"COALESCE({col}::int::float8, 'NaN')")
        else:
            cols.append(f"COALESCE({col}::float8, 'NaN')")
    return ", ".join(cols)


def _model_input(model: LoadedModel, X: np.ndarray) -> Any:
    """The codes matrix read by COPY as the model takes it."""
    schema = model.schema
    if schema.get("input") == "codes":
        return X
    columns: dict[str, np.ndarray] = {}
    for j, f in enumerate(schema["features"]):
        col = X[:, j]
        if f["type"] == "str":
            cats = np.empty(len(f["categories"]) + 1, dtype=object)
            cats[:-1] = f["categories"]
            cats[-1] = None  # code -1: NULL or a value outside the categories
            columns[f["name"]] = cats[col.astype(np.int64)]
        elif f["type"] == "bool" and not np.isnan(col).any():
            columns[f["name"]] = col != 0
        else:
            columns[f["name"]] = col
    return model_input(columns, schema)


def _read_chunk(cur: Any, model: LoadedModel, query_of: Any) -> tuple[np.ndarray, Any]:
    """(entity ids, model input) of a chunk: a binary COPY parsed by numpy where every
    feature reads as float8, else a CSV COPY parsed by pandas (free-text features)."""
    schema = model.schema
    ft = FeatureTable.of(schema)
    assert ft is not None
    if _binary_readable(schema):
        query = query_of(f"{quote(ft.key)}::int8, {_select_features(schema)}")
        buf = _Sink()
        cur.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT binary)", buf)
        ids, X = pgcopy.read_float_rows(buf.getvalue(), len(schema["features"]))
        return ids, (_model_input(model, X) if len(ids) else None)
    import pandas as pd

    names = [f["name"] for f in schema["features"]]
    query = query_of(", ".join([f"{quote(ft.key)}::int8"] + [quote(n) for n in names]))
    buf = _Sink()
    cur.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT csv)", buf)
    dtypes = {f["name"]: object for f in schema["features"] if f["type"] == "str"}
    frame = pd.read_csv(
        io.BytesIO(buf.getvalue()), header=None, names=["__key", *names], dtype=dtypes
    )
    columns: dict[str, np.ndarray] = {}
    for f in schema["features"]:
        series = frame[f["name"]]
        if f["type"] == "str":
            columns[f["name"]] = np.asarray(series.where(series.notna(), None), dtype=object)
        elif f["type"] == "bool":
            columns[f["name"]] = series.map({"t": True, "f": False}).to_numpy()
        else:
            columns[f["name"]] = series.to_numpy(dtype=np.float64)
    ids = frame["__key"].to_numpy(dtype=np.int64)
    return ids, (model_input(columns, schema) if len(ids) else None)


#: A run has at least this many chunks when its rows allow (so progress moves on a small
#: table and every pool process gets work), each of at least ``MIN_CHUNK_ROWS`` rows.
MIN_CHUNKS = 8
MIN_CHUNK_ROWS = 1000


def chunk_size(total: int, chunk_rows: int) -> int:
    """Rows per chunk for a run of ``total`` rows: ``chunk_rows`` (the memory bound) for a
    big table, smaller for a small one, down to ``MIN_CHUNK_ROWS``."""
    return max(1, min(chunk_rows, max(MIN_CHUNK_ROWS, math.ceil(total / MIN_CHUNKS))))


def plan(session: Session, job: Job, *, chunk_rows: int) -> list[ScoringChunk]:
    """The run's chunks still to do; planned on first call, reused on every later one.

    ``chunk_rows`` (INFERQ_SCORE_CHUNK_ROWS) is big enough that per-call costs vanish and
    small enough that a worker's memory stays flat whatever the table size.
    """
    session.execute(
        pg_insert(ScoringRun)
        .values(
            id=job.id,
            job_id=job.id,
            model=job.model,
            version=job.model_version,
            segment=job.request.get("segment") or {},
            status="running",
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )
    run = session.get(ScoringRun, job.id, with_for_update=True)
    assert run is not None
    run.status = "running"  # a scheduled run is recorded as queued by beat
    if run.chunks_total == 0 and run.rows_total == 0:
        mv = get_version(session, run.model, run.version)
        ft = FeatureTable.of(mv.input_schema) if mv is not None else None
        if ft is None:
            raise LookupError(f"model {run.model!r} v{run.version} has no feature table")
        where, params = _where(run.segment)
        owned, owner = ft.owned_by(job.tenant)  # only the job's tenant's rows
        cur = session.connection().connection.cursor()
        key = quote(ft.key)
        condition = cur.mogrify(f"WHERE {where} AND {owned}", {**params, **owner}).decode()
        cur.execute(f"SELECT min({key}), max({key}), count(*) FROM {ft.sql_name} {condition}")
        lo, hi, total = cur.fetchone()  # type: ignore[misc]
        n = max(1, math.ceil(total / chunk_size(total, chunk_rows))) if total else 0
        if n:
            bounds = np.linspace(lo, hi + 1, n + 1).astype(np.int64)
            session.add_all(
                ScoringChunk(run_id=run.id, chunk=i, lo=int(bounds[i]), hi=int(bounds[i + 1]) - 1)
                for i in range(n)
            )
        ensure_partition(cur, run.id)
        run.chunks_total, run.rows_total = n, total
        job_row = session.get(Job, job.id)
        if job_row is not None:
            job_row.progress = {"done": 0, "total": total}
        session.flush()
        log.info("planned run %s: %d rows in %d chunks", run.id, total, n)
    return list(
        session.scalars(
            select(ScoringChunk)
            .where(ScoringChunk.run_id == run.id, ScoringChunk.done_at.is_(None))
            .order_by(ScoringChunk.chunk)
        )
    )


def partition_name(run_id: uuid.UUID) -> str:
    """The run's own partition of ``predictions``."""
    return f"predictions_{run_id.hex}"


def ensure_partition(cur: Any, run_id: uuid.UUID) -> None:
    """Create and attach the run's partition unless it is there. Created on its own, then
    attached: attaching locks ``predictions`` only against other attaches and detaches
    (SHARE UPDATE EXCLUSIVE), where ``CREATE TABLE ... PARTITION OF`` would block every
    reader of the table for the moment (ACCESS EXCLUSIVE)."""
    name = partition_name(run_id)
    cur.execute(
        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(%s) "
        "AND inhparent = 'predictions'::regclass",
        (name,),
    )
    if cur.fetchone():
        return
    cur.execute(f'CREATE TABLE IF NOT EXISTS "{name}" (LIKE predictions INCLUDING DEFAULTS)')
    cur.execute(
        f'ALTER TABLE predictions ATTACH PARTITION "{name}" FOR VALUES IN (%s)', (str(run_id),)
    )


def drop_partition(run_id: uuid.UUID) -> bool:
    """Drop a run's rows whole: detach its partition concurrently (readers and writers of
    other runs carry on), then drop it. Safe to repeat after an interruption. Returns
    whether there was a partition."""
    from shared.db import autocommit

    name = partition_name(run_id)
    with autocommit() as conn:  # DETACH ... CONCURRENTLY runs outside a transaction
        found = conn.execute(
            text(
                "SELECT i.inhdetachpending FROM pg_class c "
                "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = to_regclass(:n)"
            ),
            {"n": name},
        ).first()
        if found is None:
            return False
        pending = found[0]
        if pending is not None:  # still attached (detach pending after an interruption)
            how = "FINALIZE" if pending else "CONCURRENTLY"
            conn.exec_driver_sql(f'ALTER TABLE predictions DETACH PARTITION "{name}" {how}')
        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
        return True


class ChunkOutcome:
    SCORED = "scored"
    ALREADY_DONE = "already_done"
    JOB_ENDED = "job_ended"


def score_chunk(engine: Engine, model: LoadedModel, run_id: uuid.UUID, chunk: int) -> str:
    """Score one chunk exactly once (see module doc). Returns a ``ChunkOutcome``."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(
            "SELECT c.lo, c.hi, c.done_at, r.segment, j.status, j.tenant FROM scoring_chunks c "
            "JOIN scoring_runs r ON r.id = c.run_id JOIN jobs j ON j.id = r.job_id "
            "WHERE c.run_id = %s AND c.chunk = %s FOR UPDATE OF c",
            (str(run_id), chunk),
        )
        lo, hi, done_at, segment, status, tenant = cur.fetchone()  # type: ignore[misc]
        if done_at is not None:
            raw.rollback()
            return ChunkOutcome.ALREADY_DONE
        if status != JobStatus.RUNNING:
            raw.rollback()
            return ChunkOutcome.JOB_ENDED
        where, params = _where(segment)
        ft = FeatureTable.of(model.schema)
        assert ft is not None

        # Only the condition goes through mogrify: a '%' in a category or a column name
        # stays a '%'.
        owned, owner = ft.owned_by(tenant)
        condition = cur.mogrify(
            f"WHERE {quote(ft.key).replace('%', '%%')} BETWEEN %(lo)s AND %(hi)s AND {where} "
            f"AND {owned}",
            {**params, **owner, "lo": lo, "hi": hi},
        ).decode()

        def query_of(columns: str) -> str:
            return f"SELECT {columns} FROM {ft.sql_name} {condition}"

        ids, X = _read_chunk(cur, model, query_of)
        n = len(ids)
        hist = [0] * HIST_BINS
        if n:
            out = model.predict(X)
            del X
            multiclass = out.proba is not None
            stream = pgcopy.prediction_records(
                run_id=run_id.bytes,
                entity_ids=ids,
                model=model.name,
                version=model.version,
                scores=out.scores,
                labels=None if multiclass else out.labels,
                classes=out.labels if multiclass else None,
                scored_at=datetime.now(UTC),
            )
            cur.copy_expert(
                "COPY predictions (run_id, entity_id, model, version, score, label, "
                "predicted_class, scored_at) FROM STDIN (FORMAT binary)",
                _Source(stream),
            )
            if model.kind == "classifier":  # probabilities: a fixed 0..1 histogram
                hist = np.histogram(out.scores, bins=HIST_BINS, range=(0.0, 1.0))[0].tolist()
        cur.execute(
            "UPDATE scoring_chunks SET rows = %s, histogram = %s::jsonb, done_at = now() "
            "WHERE run_id = %s AND chunk = %s",
            (n, str(hist), str(run_id), chunk),
        )
        cur.execute(
            "UPDATE scoring_runs SET rows_scored = rows_scored + %s WHERE id = %s "
            "RETURNING rows_scored, rows_total",
            (n, str(run_id)),
        )
        done, total = cur.fetchone()  # type: ignore[misc]
        cur.execute(
            "UPDATE jobs SET heartbeat_at = now(), "
            "progress = jsonb_build_object('done', %s::bigint, 'total', %s::bigint)"
            " WHERE id = (SELECT job_id FROM scoring_runs WHERE id = %s)",
            (done, total, str(run_id)),
        )
        raw.commit()
        return ChunkOutcome.SCORED
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def finalize(session: Session, run_id: uuid.UUID, *, public_url: str = "") -> dict | None:
    """If every chunk is done and the run is not yet closed, close it: the job's result."""
    run = session.get(ScoringRun, run_id, with_for_update=True)
    if run is None or run.status != "running":
        return None
    pending = session.scalar(
        select(func.count()).where(ScoringChunk.run_id == run_id, ScoringChunk.done_at.is_(None))
    )
    if pending:
        return None
    hists = session.scalars(select(ScoringChunk.histogram).where(ScoringChunk.run_id == run_id))
    counts = np.sum([h for h in hists if h] or [[0] * HIST_BINS], axis=0).tolist()
    now = datetime.now(UTC)
    duration = (now - run.started_at).total_seconds()
    session.execute(
        update(ScoringRun)
        .where(ScoringRun.id == run_id)
        .values(status="succeeded", finished_at=now, duration_s=duration)
    )
    edges = np.linspace(0, 1, HIST_BINS + 1).round(2).tolist()
    return {
        "run_id": str(run_id),
        "rows_scored": run.rows_scored,
        "duration_s": round(duration, 3),
        "model_version": run.version,
        "rows": {
            "table": "predictions",
            "where": f"run_id = '{run_id}'",
            "csv": f"{public_url}/v1/jobs/{run.job_id}/result.csv",
        },
        "histogram": {"edges": edges, "counts": counts} if any(counts) else None,
    }


def latest_score(session: Session, entity_id: int) -> dict[str, Any] | None:
    """An entity's latest score: one index probe of (entity_id, scored_at DESC)."""
    row = (
        session.execute(
            text(
                "SELECT run_id, model, version, score, label, predicted_class, scored_at "
                "FROM predictions "
                "WHERE entity_id = :e ORDER BY scored_at DESC LIMIT 1"
            ),
            {"e": entity_id},
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


class _Sink:
    """A write-only file for COPY TO, keeping the chunks it is given (no re-copying)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class _Source:
    """A read-only file over bytes for COPY FROM."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self._view) - self._pos
        out = self._view[self._pos : self._pos + size]
        self._pos += len(out)
        return bytes(out)

    readline = read
