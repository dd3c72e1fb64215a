"""Shadow versions: a staging version scores a sample of its model's production predict
traffic, beside production, and is compared with it. Clients never see its answers.

``PUT /v1/models/{name}/shadow`` records the shadow (``model_shadows``). A predict worker
settles and announces each batch first and keeps its sampled rows; when no job has come
for ``INFERQ_PREDICT_IDLE_S``, when it hands its draining over to the next delivery, or
when the kept rows reach ``DUE_ROWS`` or have waited ``DUE_S``, it predicts them with the
shadow version, one call per model, and logs them in ``shadow_predictions`` with
production's score and label beside them: production jobs do not wait for the shadow
while others are queued behind it, nor, but for the due case, arrive to find it running.
A job is sampled when its id falls under the sample rate (ids are random, so the share is
the rate's, and every delivery of a job decides alike). ``report`` compares the two:
rows compared, label agreement, mean and p99 absolute score difference, and each
version's score drift against its own reference.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Integer, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared import sql
from shared.config import get_settings
from shared.models.registry import ModelCache, get_version, production_versions
from shared.monitoring.drift import compare
from shared.monitoring.profile import columns_of
from shared.monitoring.reports import thresholds
from shared.orm import ModelShadow, PredictionLog, ShadowPrediction
from shared.sql import Statement

__all__ = ["Shadows", "Work", "sampled", "start", "stop", "report", "LOG", "DUE_ROWS", "DUE_S"]

log = logging.getLogger(__name__)

_SPAN = 1 << 32
#: Kept shadow rows are predicted at the latest when this many wait, or the oldest has
#: waited this long, even if production jobs are pending.
DUE_ROWS = 2000
DUE_S = 2.0


def sampled(job_id: uuid.UUID, rate: float) -> bool:
    """Whether a job is in a ``rate`` sample: its id's low bits below the rate."""
    return (job_id.int % _SPAN) < rate * _SPAN


@dataclass
class Work:
    """The rows of one model's sampled jobs, waiting for its shadow version."""

    name: str
    version: int
    production_version: int
    keys: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)

    def add(self, other: Work) -> None:
        self.keys += other.keys
        self.rows += other.rows
        self.scores += other.scores
        self.labels += other.labels


LOG = Statement(
    "inferq_shadow_log",
    ("uuid[]", "int[]", "int[]", "text[]", "int[]", "float8[]", "text[]", "float8[]", "text[]"),
    """INSERT INTO shadow_predictions
        (job_id, row, version, model, production_version, score, label, production_score,
         production_label)
    SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT DO NOTHING""",
    prepare=True,
)


def _label(value: Any) -> str | None:
    return None if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class Shadows:
    """A worker process's view of the active shadows, read again every
    ``INFERQ_MODEL_POLL_S``; ``plan`` picks a batch's sampled rows, ``run`` predicts them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = -1e9
        self._active: dict[str, tuple[int, float, int]] = {}  # name -> (shadow, rate, prod)

    def active(self, session_of: Any) -> dict[str, tuple[int, float, int]]:
        with self._lock:
            if time.monotonic() - self._read_at < get_settings().model_poll_s:
                return self._active
            self._read_at = time.monotonic()  # a failed read is not retried before the next
            with session_of() as session:
                prod = production_versions(session)
                rows = session.execute(select(ModelShadow)).scalars().all()
                self._active = {
                    r.name: (r.version, r.sample_rate, prod[r.name]) for r in rows if r.name in prod
                }
            return self._active

    def plan(self, logs: Sequence[dict[str, Any]], session_of: Any) -> list[Work]:
        """The sampled production rows of a settled batch, by model. Never raises: the
        batch is settled and its hot copies are still to be written."""
        try:
            active = self.active(session_of)
        except Exception:
            log.warning("could not read the shadow versions", exc_info=True)
            return []
        if not active:
            return []
        work: dict[str, Work] = {}
        for entry in logs:
            found = active.get(entry["model"])
            if found is None:
                continue
            version, rate, prod = found
            if entry["version"] != prod or not sampled(entry["job_id"], rate):
                continue
            w = work.setdefault(entry["model"], Work(entry["model"], version, prod))
            w.keys.append((entry["job_id"], entry["row"]))
            w.rows.append(entry["inputs"])
            w.scores.append(entry["score"])
            w.labels.append(entry["predicted_class"] or entry["label"])
        return list(work.values())

    @staticmethod
    def keep(kept: list[Work], new: list[Work]) -> list[Work]:
        """``new`` work added to ``kept`` (one ``Work`` per model and version)."""
        by = {(w.name, w.version, w.production_version): w for w in kept}
        for w in new:
            key = (w.name, w.version, w.production_version)
            if key in by:
                by[key].add(w)
            else:
                by[key] = w
        return list(by.values())

    @staticmethod
    def due(kept: list[Work]) -> bool:
        """Kept work that must run even with production jobs pending."""
        if not kept:
            return False
        rows = sum(len(w.rows) for w in kept)
        return rows >= DUE_ROWS or time.monotonic() - min(w.since for w in kept) >= DUE_S

    def run(self, conn: Connection, models: ModelCache, work: list[Work], session_of: Any) -> int:
        """Predict and log the shadow rows; returns how many. A failure is logged, never
        raised: production's jobs ended already."""
        logged = 0
        for w in work:
            try:
                model = models.cached(w.name, w.version)
                if model is None:
                    with session_of() as session:
                        model = models.get(session, w.name, w.version)
                out = model.predict_rows(w.rows)
                labels = out.labels.tolist() if out.labels is not None else [None] * len(w.rows)
                args = (
                    [str(k[0]) for k in w.keys],
                    [k[1] for k in w.keys],
                    [w.version] * len(w.keys),
                    [w.name] * len(w.keys),
                    [w.production_version] * len(w.keys),
                    out.scores.tolist(),
                    [_label(v) for v in labels],
                    w.scores,
                    [_label(v) for v in w.labels],
                )
                sql.run(conn, (LOG, args))
                logged += len(w.keys)
            except Exception:
                log.exception(
                    "shadow %s v%s could not predict %d rows", w.name, w.version, len(w.rows)
                )
        return logged


def start(session: Session, name: str, version: int, rate: float) -> ModelShadow:
    """Record (or replace) ``name``'s shadow. The caller has checked the version."""
    session.execute(
        pg_insert(ModelShadow)
        .values(name=name, version=version, sample_rate=rate)
        .on_conflict_do_update(
            index_elements=["name"],
            set_={"version": version, "sample_rate": rate, "started_at": func.now()},
        )
    )
    shadow = session.get(ModelShadow, name, populate_existing=True)
    assert shadow is not None
    return shadow


def stop(session: Session, name: str) -> bool:
    return bool(session.execute(delete(ModelShadow).where(ModelShadow.name == name)).rowcount)  # type: ignore[attr-defined]


def report(session: Session, shadow: ModelShadow) -> dict[str, Any]:
    """The shadow against production since it started."""
    sp = ShadowPrediction
    diff = func.abs(sp.score - sp.production_score)
    where = (
        sp.model == shadow.name,
        sp.version == shadow.version,
        sp.created_at >= shadow.started_at,
    )
    n, agree, mean_diff, p99 = session.execute(
        select(
            func.count(),
            func.avg(sp.label.is_not_distinct_from(sp.production_label).cast(Integer)),
            func.avg(diff),
            func.percentile_cont(0.99).within_group(diff),
        ).where(*where)
    ).one()
    out: dict[str, Any] = {
        "model": shadow.name,
        "version": shadow.version,
        "sample_rate": shadow.sample_rate,
        "started_at": shadow.started_at.isoformat(),
        "rows_compared": int(n),
        "label_agreement": float(agree) if agree is not None else None,
        "mean_abs_score_diff": float(mean_diff) if mean_diff is not None else None,
        "p99_abs_score_diff": float(p99) if p99 is not None else None,
        "drift": {},
    }
    rows = session.execute(
        select(PredictionLog.inputs, sp.score, sp.production_score, sp.production_version)
        .join(PredictionLog, (PredictionLog.job_id == sp.job_id) & (PredictionLog.row == sp.row))
        .where(*where)
        .order_by(sp.created_at.desc())
        .limit(get_settings().drift_max_rows)
    ).all()
    if not rows:
        return out
    groups: dict[tuple[str, int], tuple[list[Any], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        for role, version, score in (
            ("shadow", shadow.version, r.score),
            ("production", r.production_version, r.production_score),
        ):
            inputs, scores = groups[(role, version)]
            inputs.append(r.inputs)
            scores.append(score)
    for (role, version), (inputs, scores) in groups.items():
        mv = get_version(session, shadow.name, version)
        if mv is None or not mv.reference_profile:
            out["drift"][role] = None
            continue
        names = [f["name"] for f in mv.input_schema["features"]]
        found = compare(
            mv.reference_profile,
            mv.input_schema,
            columns_of(inputs, names),
            scores,
            thresholds(),
        )
        out["drift"][role] = {
            "version": version,
            "drifted": found["drifted"],
            "features": [f["feature"] for f in found["features"] if f["drifted"]],
            "score": found["score"],
        }
    return out
