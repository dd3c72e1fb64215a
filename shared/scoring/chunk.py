"""One chunk of a score run: its rows streamed out of the feature table with a COPY, then
predicted a block at a time as they are COPYed back into a table of its own (a partition
of the run's partition of ``predictions`` once the run closes, see
``shared.scoring.partitions``), indexed, in the transaction that marks the chunk done,
under the chunk's row lock (a chunk delivered twice writes once)."""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import Engine

from shared.jobs.fields import JobStatus
from shared.models.encoding import model_input
from shared.models.features import FeatureTable, quote
from shared.models.registry import LoadedModel
from shared.scoring import pgcopy
from shared.scoring.partitions import (
    chunk_index_statements,
    chunk_table_name,
    chunk_table_statements,
    partition_name,
)
from shared.scoring.plan import HIST_BINS, _where

log = logging.getLogger(__name__)

#: Rows predicted and sent at a time within a chunk.
BLOCK_ROWS = 16_384


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
            whens = " ".join(
                f"WHEN '{c.replace(chr(39), chr(39) * 2)}' THEN {i}"
                for i, c in enumerate(f["categories"])
            )
            cols.append(f"(CASE {col}::text {whens} ELSE -1 END)::float8")
        elif f["type"] == "bool":
            cols.append(f"COALESCE({col}::int::float8, 'NaN')")
        else:
            cols.append(f"COALESCE({col}::float8, 'NaN')")
    return ", ".join(cols)


def _read_chunk(cur: Any, model: LoadedModel, query_of: Any) -> tuple[np.ndarray, Any, bool]:
    """(entity ids, X, whether X is the codes matrix) of a chunk: a binary COPY parsed by
    numpy into codes where every feature reads as float8, else a CSV COPY parsed by pandas
    into the model input (free-text features)."""
    schema = model.schema
    ft = FeatureTable.of(schema)
    assert ft is not None
    if _binary_readable(schema):
        query = query_of(f"{quote(ft.key)}::int8, {_select_features(schema)}")
        buf = io.BytesIO()  # psycopg2 writes once a row: a C method, no Python frame
        cur.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT binary)", buf)
        ids, X = pgcopy.read_float_rows(buf.getvalue(), len(schema["features"]))
        return ids, X, True
    import pandas as pd

    names = [f["name"] for f in schema["features"]]
    query = query_of(", ".join([f"{quote(ft.key)}::int8"] + [quote(n) for n in names]))
    buf = io.BytesIO()
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
    return ids, (model_input(columns, schema) if len(ids) else None), False


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
            "SELECT c.lo, c.hi, c.done_at, r.segment, r.started_at, j.status, j.tenant, "
            "(SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)) "
            "FROM scoring_chunks c "
            "JOIN scoring_runs r ON r.id = c.run_id JOIN jobs j ON j.id = r.job_id "
            "WHERE c.run_id = %s AND c.chunk = %s FOR UPDATE OF c",
            (partition_name(run_id), str(run_id), chunk),
        )
        row = cur.fetchone()
        assert row is not None
        lo, hi, done_at, segment, started_at, status, tenant, kind = row
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

        t_read = time.perf_counter()
        ids, X, codes = _read_chunk(cur, model, query_of)
        n = len(ids)
        t_write = time.perf_counter()
        hist = [0] * HIST_BINS
        stream = None
        if n:
            # A run planned before chunk tables has one plain table (see partitions).
            chunk_table = kind != "r"
            if chunk_table:
                table, columns = chunk_table_name(run_id, chunk), pgcopy.OWN_COLUMNS
                cur.execute(
                    ";\n".join(
                        chunk_table_statements(
                            run_id,
                            chunk,
                            lo,
                            hi,
                            started_at=started_at,
                            model=model.name,
                            version=model.version,
                        )
                    )
                )
            else:
                table, columns = partition_name(run_id), pgcopy.RECORD_COLUMNS
            stream = _Predicted(
                model,
                X,
                codes,
                ids,
                run_id=run_id.bytes,
                scored_at=started_at,  # a run's rows are scored as of its start
                constants=not chunk_table,  # a chunk table has them as its defaults
            )
            del X
            try:
                cur.copy_expert(f'COPY "{table}" ({columns}) FROM STDIN (FORMAT binary)', stream)
            except Exception:
                if stream.error is not None:  # the model's, not the database's: as is
                    raise stream.error from None
                raise
            if chunk_table:
                cur.execute(";\n".join(chunk_index_statements(run_id, chunk)))
            if model.kind == "classifier":  # probabilities: a fixed 0..1 histogram
                hist = np.histogram(stream.scores, bins=HIST_BINS, range=(0.0, 1.0))[0].tolist()
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
        t_end = time.perf_counter()
        predict_s = stream.predict_s if stream is not None else 0.0
        log.info(
            "chunk %d: %d rows, read %.3f s, predict %.3f s, write, index and commit %.3f s",
            chunk,
            n,
            t_write - t_read,
            predict_s,
            t_end - t_write - predict_s,
        )
        return ChunkOutcome.SCORED
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


class _Predicted:
    """A chunk's COPY FROM stream, predicted a block at a time as PostgreSQL asks for it:
    the server stores one block while the worker predicts the next (a COPY's data is sent
    ahead, not acknowledged row by row). ``scores`` holds every row's score once read."""

    def __init__(
        self,
        model: LoadedModel,
        X: Any,
        codes: bool,
        ids: np.ndarray,
        *,
        run_id: bytes,
        scored_at: Any,
        constants: bool,
    ) -> None:
        self.scores = np.empty(len(ids), dtype=np.float64)
        self.predict_s = 0.0
        self.error: Exception | None = None
        self._blocks = self._encode(
            model, X, codes, ids, dict(run_id=run_id, scored_at=scored_at, constants=constants)
        )

    def _encode(
        self, model: LoadedModel, X: Any, codes: bool, ids: np.ndarray, run: dict[str, Any]
    ) -> Iterator[bytes]:
        yield pgcopy.HEADER
        # Codes are sliced into blocks; another model input is predicted in one call.
        step = BLOCK_ROWS if codes else max(1, len(ids))
        for lo in range(0, len(ids), step):
            t0 = time.perf_counter()
            out = model.predict_codes(X[lo : lo + step]) if codes else model.predict(X)
            self.predict_s += time.perf_counter() - t0
            multiclass = out.proba is not None
            self.scores[lo : lo + len(out.scores)] = out.scores
            yield pgcopy.prediction_records(
                entity_ids=ids[lo : lo + step],
                model=model.name,
                version=model.version,
                scores=out.scores,
                labels=None if multiclass else out.labels,
                classes=out.labels if multiclass else None,
                framed=False,
                **run,
            )
        yield pgcopy.TRAILER

    def read(self, size: int = -1) -> bytes:
        try:
            return next(self._blocks, b"")
        except Exception as exc:  # psycopg2 would report it as a cancelled COPY
            self.error = exc
            raise

    readline = read
