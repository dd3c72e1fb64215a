"""PostgreSQL binary COPY, both ways, as numpy arrays: no per-row Python on either side.

When every column of a row has a fixed width and no NULLs, a binary COPY stream is an
array of identical records (a 2-byte field count, then a 4-byte length and the value for
each field, all big-endian), so ``np.frombuffer`` reads it and ``ndarray.tobytes`` writes it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

__all__ = [
    "HEADER",
    "TRAILER",
    "read_float_rows",
    "prediction_records",
    "PG_EPOCH",
    "RECORD_COLUMNS",
    "OWN_COLUMNS",
]

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def read_float_rows(data: bytes | memoryview, n_float: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of ``COPY (SELECT id::int8, f1::float8, ...) TO STDOUT
    (FORMAT binary)``.
    """
    dtype = np.dtype(
        [("n", ">i2"), ("id_len", ">i4"), ("id", ">i8")]
        + [item for j in range(n_float) for item in ((f"l{j}", ">i4"), (f"f{j}", ">f8"))]
    )
    body = memoryview(data)[len(HEADER) : len(data) - len(TRAILER)]
    if len(body) % dtype.itemsize:
        raise ValueError("COPY stream is not fixed-width: a NULL or a non-float8 column")
    rec = np.frombuffer(body, dtype=dtype)
    ids = rec["id"].astype(np.int64)
    X = np.empty((len(rec), n_float), dtype=np.float64)
    for j in range(n_float):
        X[:, j] = rec[f"f{j}"]
    return ids, X


#: The columns of a full prediction record, in stream order.
RECORD_COLUMNS = "run_id, entity_id, model, version, score, label, predicted_class, scored_at"
#: Those of a record without the run's constants (run_id, model, version, scored_at): for a
#: table that has the constants as its column defaults (a score run's chunk table).
OWN_COLUMNS = "entity_id, score, label, predicted_class"


def prediction_records(
    *,
    run_id: bytes,
    entity_ids: np.ndarray,
    model: str,
    version: int,
    scores: np.ndarray,
    labels: np.ndarray | None,
    scored_at: datetime,
    classes: np.ndarray | None = None,
    constants: bool = True,
    framed: bool = True,
) -> bytes:
    """A binary COPY stream for ``predictions (RECORD_COLUMNS)``, or, with ``constants``
    false, for ``(OWN_COLUMNS)`` only; a missing label or class is written as NULL.

    A text field's width is its length, so rows are written in one block per distinct
    class (row order means nothing to COPY). With ``framed`` false, the rows alone (no
    header, no trailer): a part of a stream.
    """
    run = _Constants(run_id, model, version, scored_at) if constants else None
    head, tail = (HEADER, TRAILER) if framed else (b"", b"")
    if classes is None:
        return head + _records(run, entity_ids, scores, labels, None) + tail
    text = classes.astype(str)
    parts = [head]
    for value in np.unique(text):
        rows = text == value
        parts.append(_records(run, entity_ids[rows], scores[rows], None, str(value)))
    parts.append(tail)
    return b"".join(parts)


class _Constants:
    """What every row of a run shares."""

    def __init__(self, run_id: bytes, model: str, version: int, scored_at: datetime) -> None:
        self.run_id, self.name, self.version = run_id, model.encode(), version
        self.ts = (scored_at - PG_EPOCH) // timedelta(microseconds=1)  # exact, not via a float


def _records(
    run: _Constants | None,
    entity_ids: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray | None,
    cls: str | None,
) -> bytes:
    fields: list[tuple[str, str]] = [("n", ">i2")]
    if run is not None:
        fields.append(("run_len", ">i4"))
        fields.append(("run", "V16"))
    fields += [("eid_len", ">i4"), ("eid", ">i8")]
    if run is not None:
        fields += [("model_len", ">i4"), ("model", f"S{len(run.name)}")]
        fields += [("ver_len", ">i4"), ("ver", ">i4")]
    fields += [("score_len", ">i4"), ("score", ">f8"), ("label_len", ">i4")]
    if labels is not None:
        fields.append(("label", "u1"))
    fields.append(("class_len", ">i4"))
    encoded = cls.encode() if cls is not None else b""
    if encoded:
        fields.append(("cls", f"S{len(encoded)}"))
    if run is not None:
        fields += [("ts_len", ">i4"), ("ts", ">i8")]
    rec = np.empty(len(entity_ids), dtype=np.dtype(fields))
    rec["n"] = 8 if run is not None else 4
    rec["eid_len"], rec["eid"] = 8, entity_ids
    rec["score_len"], rec["score"] = 8, scores
    if labels is not None:
        rec["label_len"], rec["label"] = 1, labels.astype(np.uint8)
    else:
        rec["label_len"] = -1
    if cls is not None:
        rec["class_len"] = len(encoded)
        if encoded:
            rec["cls"] = encoded
    else:
        rec["class_len"] = -1
    if run is not None:
        rec["run_len"], rec["run"] = 16, np.frombuffer(run.run_id, dtype="V16")[0]
        rec["model_len"], rec["model"] = len(run.name), run.name
        rec["ver_len"], rec["ver"] = 4, run.version
        rec["ts_len"], rec["ts"] = 8, run.ts
    return rec.tobytes()
