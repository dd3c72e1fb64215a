"""Drift reports: windows read, compared, stored in ``drift_reports``, published to
Prometheus through Redis.

An online window is the newest prediction logs of a version within
``INFERQ_DRIFT_WINDOW_S`` (at most ``INFERQ_DRIFT_MAX_ROWS`` of them); a score run's
window is a sample of the rows it scored, joined back to its feature table. ``ops.drift``
(beat, every ``INFERQ_DRIFT_EVERY_S``) reports on every production version that has a
reference profile; every score run reports when it closes; ``inferq drift MODEL`` reports
on demand.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import sql
from shared.config import get_settings
from shared.metrics import SEP as _SEP
from shared.metrics import drift_key
from shared.models.features import FeatureTable, quote
from shared.models.registry import get_version, production_versions
from shared.monitoring.drift import Thresholds, compare
from shared.monitoring.profile import columns_of
from shared.orm import DriftReport, ModelVersion, PredictionLog, ScoringRun
from shared.scoring.partitions import partition_name
from shared.sql import Statement

__all__ = [
    "thresholds",
    "online_report",
    "run_report",
    "report_all",
    "latest",
    "as_dict",
    "publish",
    "NoReferenceError",
]

log = logging.getLogger(__name__)


class NoReferenceError(LookupError):
    """The version has no reference profile to compare with."""


def thresholds() -> Thresholds:
    s = get_settings()
    return Thresholds(psi=s.drift_psi_threshold, p_value=s.drift_p_value, min_rows=s.drift_min_rows)


def _profile(mv: ModelVersion) -> dict[str, Any]:
    if not mv.reference_profile:
        raise NoReferenceError(
            f"{mv.name} v{mv.version} has no reference profile: register it with a sample or "
            "a feature table, or train it, to compare its traffic with"
        )
    return mv.reference_profile


def _store(session: Session, mv: ModelVersion, found: dict[str, Any], **where: Any) -> DriftReport:
    report = DriftReport(
        model=mv.name,
        version=mv.version,
        rows_reference=found["rows_reference"],
        rows_window=found["rows_window"],
        enough_rows=found["enough_rows"],
        drifted=found["drifted"],
        features=found["features"],
        detail={
            "score": found["score"],
            "alpha": found["alpha"],
            "thresholds": found["thresholds"],
        },
        **where,
    )
    session.add(report)
    session.flush()
    return report


def online_report(
    session: Session,
    mv: ModelVersion,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DriftReport:
    """Compare the version's online window (``since`` .. ``until``, default the last
    ``INFERQ_DRIFT_WINDOW_S``) with its reference; stored in the session."""
    s = get_settings()
    profile = _profile(mv)
    until = until or datetime.now(UTC)
    since = since or until - timedelta(seconds=s.drift_window_s)
    logs = session.execute(
        select(PredictionLog.inputs, PredictionLog.score)
        .where(
            PredictionLog.model == mv.name,
            PredictionLog.version == mv.version,
            PredictionLog.created_at >= since,
            PredictionLog.created_at < until,
        )
        .order_by(PredictionLog.created_at.desc())
        .limit(s.drift_max_rows)
    ).all()
    names = [f["name"] for f in mv.input_schema["features"]]
    columns = columns_of((r.inputs for r in logs), names)
    found = compare(profile, mv.input_schema, columns, [r.score for r in logs], thresholds())
    return _store(session, mv, found, source="online", window_start=since, window_end=until)


def run_report(session: Session, run_id: uuid.UUID) -> DriftReport:
    """Compare a score run's rows (a sample of at most ``INFERQ_DRIFT_MAX_ROWS``, read
    back from its feature table) and their scores with the version's reference."""
    s = get_settings()
    run = session.get(ScoringRun, run_id)
    if run is None:
        raise LookupError(f"no score run {run_id}")
    mv = get_version(session, run.model, run.version)
    if mv is None:
        raise LookupError(f"{run.model} v{run.version} is not registered")
    profile = _profile(mv)
    ft = FeatureTable.of(mv.input_schema)
    if ft is None:
        raise LookupError(f"{mv.name} v{mv.version} has no feature table")
    names = [f["name"] for f in mv.input_schema["features"]]
    share = min(100.0, 100.0 * 1.5 * s.drift_max_rows / max(1, run.rows_scored or run.rows_total))
    cols = ", ".join(f"f.{quote(n)}" for n in names)
    sample = Statement(
        "inferq_drift_run_sample",
        ("float8", "bigint"),
        f'SELECT {cols}, p.score FROM "{partition_name(run.id)}" p TABLESAMPLE BERNOULLI ($1) '
        f"JOIN {ft.sql_name} f ON f.{quote(ft.key)} = p.entity_id LIMIT $2",
        prepare=False,
    )
    rows = sql.run(session.connection(), (sample, (share, s.drift_max_rows)))
    columns = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    found = compare(profile, mv.input_schema, columns, [r[-1] for r in rows], thresholds())
    return _store(
        session,
        mv,
        found,
        source="score",
        run_id=run.id,
        window_start=run.started_at,
        window_end=run.finished_at or datetime.now(UTC),
    )


def report_all(session: Session) -> list[DriftReport]:
    """An online report for every production version that has a reference profile."""
    out = []
    for name, version in sorted(production_versions(session).items()):
        mv = get_version(session, name, version)
        if mv is None or not mv.reference_profile:
            continue
        out.append(online_report(session, mv))
    return out


def latest(
    session: Session, name: str, version: int, *, run_id: uuid.UUID | None = None
) -> DriftReport | None:
    """The newest online report of a version, or the report of score run ``run_id``."""
    q = select(DriftReport).where(DriftReport.model == name, DriftReport.version == version)
    if run_id is not None:
        q = q.where(DriftReport.run_id == run_id)
    else:
        q = q.where(DriftReport.source == "online")
    return session.scalar(q.order_by(DriftReport.created_at.desc(), DriftReport.id.desc()).limit(1))


def as_dict(report: DriftReport) -> dict[str, Any]:
    """A report as the API shows it."""
    detail = report.detail or {}
    return {
        "model": report.model,
        "version": report.version,
        "source": report.source,
        "run_id": str(report.run_id) if report.run_id else None,
        "window": {
            "start": report.window_start.isoformat() if report.window_start else None,
            "end": report.window_end.isoformat(),
        },
        "rows_reference": report.rows_reference,
        "rows_window": report.rows_window,
        "enough_rows": report.enough_rows,
        "drifted": report.drifted,
        "thresholds": detail.get("thresholds"),
        "alpha": detail.get("alpha"),
        "features": report.features,
        "score": detail.get("score"),
        "created_at": report.created_at.isoformat() if report.created_at else None,
    }


def publish(redis: Redis, report: DriftReport) -> None:
    """The report's figures as gauges (read by ``drift_metrics`` at scrape time): they
    replace the version's earlier ones."""
    key = drift_key()
    prefix = _SEP.join((report.model, str(report.version))) + _SEP
    old = [
        k
        for k in redis.hkeys(key)
        if (k.decode() if isinstance(k, bytes) else k).startswith(prefix)
    ]
    values: dict[str, float] = {prefix + "rows": float(report.rows_window)}
    for f in report.features:
        for statistic, value in (("psi", f.get("psi")), (f["statistic"], f.get("value"))):
            if value is not None:
                values[prefix + _SEP.join(("feature", f["feature"], statistic))] = float(value)
    score = (report.detail or {}).get("score") or {}
    for statistic, value in (("psi", score.get("psi")), ("ks", score.get("value"))):
        if value is not None:
            values[prefix + _SEP.join(("prediction", statistic))] = float(value)
    pipe = redis.pipeline(transaction=True)
    if old:
        pipe.hdel(key, *old)
    pipe.hset(key, mapping=values)  # type: ignore[arg-type]
    pipe.execute()
