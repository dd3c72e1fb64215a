"""A score run's plan and close: the segment checked, the run planned once into id-range
chunks (stored in ``scoring_chunks``, shared by every worker process on every machine),
and the run finalized (score histogram, the job's result) by the chunk that completes it.
Scoring a chunk is ``shared.scoring.chunk``'s.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared import sql
from shared.models.features import FeatureTable, quote
from shared.models.registry import get_version
from shared.models.schema import check_value
from shared.orm import Job, Prediction, ScoringChunk, ScoringRun
from shared.scoring.partitions import attach_partition, create_partition
from shared.sql import Statement

__all__ = [
    "HIST_BINS",
    "validate_segment",
    "plan",
    "finalize",
    "latest_score",
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
        conn = session.connection()
        key = quote(ft.key)
        condition = sql.inline(conn, f"WHERE {where} AND {owned}", {**params, **owner})
        extent = Statement(
            "inferq_run_extent",
            (),
            f"SELECT min({key}), max({key}), count(*) FROM {ft.sql_name} {condition}",
            prepare=False,
        )
        [(lo, hi, total)] = sql.run(conn, (extent, ()))
        n = max(1, math.ceil(total / chunk_size(total, chunk_rows))) if total else 0
        if n:
            bounds = np.linspace(lo, hi + 1, n + 1).astype(np.int64)
            session.add_all(
                ScoringChunk(run_id=run.id, chunk=i, lo=int(bounds[i]), hi=int(bounds[i + 1]) - 1)
                for i in range(n)
            )
        create_partition(conn, run.id)
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
    t0 = time.perf_counter()
    attach_partition(session.connection(), run_id)  # its rows become readable with the run
    log.info("run %s: attached in %.2f s", run_id, time.perf_counter() - t0)
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
        # Written when the run closes (see workers.tasks.score.close_run).
        "drift": f"{public_url}/v1/models/{run.model}/drift?version={run.version}"
        f"&window={run.job_id}",
    }


def latest_score(session: Session, entity_id: int) -> dict[str, Any] | None:
    """An entity's latest score: one backward probe of the primary key (entity_id,
    scored_at, run_id) per run's partition."""
    p = Prediction
    row = (
        session.execute(
            select(p.run_id, p.model, p.version, p.score, p.label, p.predicted_class, p.scored_at)
            .where(p.entity_id == entity_id)
            .order_by(p.scored_at.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None
