"""Retention (``ops.retention``, hourly): jobs, prediction logs and score runs past their
``INFERQ_*_RETENTION_DAYS`` are deleted in batches; a score run's rows go with its
partition, dropped whole; each tenant's latest run of a model is kept."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, text

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import Job, PredictionLog
from shared.scoring.partitions import drop_partition
from workers.app import celery_app

log = logging.getLogger(__name__)

#: Rows deleted per statement: short transactions, no long lock on a hot table.
RETENTION_BATCH = 10_000


def _cutoff(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def prune_scoring_runs(days: int | None = None) -> int:
    """Score runs whose job ended more than ``INFERQ_SCORING_RUN_RETENTION_DAYS`` ago go
    whole: the run's partition of ``predictions`` is dropped (no row-by-row delete), then
    its job, which takes the run and its chunks with it. Each tenant's latest succeeded
    run of each model stays, whatever its age: it holds the current scores."""
    days = get_settings().scoring_run_retention_days if days is None else days
    with session_scope() as session:
        runs = session.execute(
            text(
                "SELECT r.id, r.job_id FROM scoring_runs r JOIN jobs j ON j.id = r.job_id "
                "WHERE j.finished_at < :cutoff AND r.id NOT IN ("
                "  SELECT DISTINCT ON (r.model, j.tenant) r.id FROM scoring_runs r "
                "  JOIN jobs j ON j.id = r.job_id WHERE r.status = 'succeeded' "
                "  ORDER BY r.model, j.tenant, r.finished_at DESC)"
            ),
            {"cutoff": _cutoff(days)},
        ).all()
    for run_id, job_id in runs:
        drop_partition(run_id)
        with session_scope() as session:
            session.execute(delete(Job).where(Job.id == job_id))
    if runs:
        log.info("dropped %d score runs older than %d days", len(runs), days)
    return len(runs)


def prune_jobs(days: int | None = None) -> int:
    """Jobs that ended more than ``INFERQ_JOB_RETENTION_DAYS`` ago (their callback
    deliveries go with them), in batches; a score job goes with its run, above."""
    days = get_settings().job_retention_days if days is None else days
    cutoff = _cutoff(days)
    total = 0
    while True:
        with session_scope() as session:
            n = session.execute(
                text(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs j "
                    "WHERE created_at < :cutoff AND finished_at < :cutoff "
                    "AND NOT EXISTS (SELECT 1 FROM scoring_runs r WHERE r.job_id = j.id) "
                    "LIMIT :batch)"
                ),
                {"cutoff": cutoff, "batch": RETENTION_BATCH},
            ).rowcount  # type: ignore[attr-defined]
        total += n
        if n < RETENTION_BATCH:
            break
    if total:
        log.info("pruned %d jobs older than %d days", total, days)
    return total


def prune_prediction_logs(days: int | None = None) -> int:
    """Prediction logs older than ``INFERQ_PREDICTION_LOG_RETENTION_DAYS``, in batches."""
    days = get_settings().prediction_log_retention_days if days is None else days
    cutoff = _cutoff(days)
    total = 0
    while True:
        with session_scope() as session:
            old = select(PredictionLog.id).where(PredictionLog.created_at < cutoff)
            n = session.execute(
                delete(PredictionLog).where(
                    PredictionLog.id.in_(old.limit(RETENTION_BATCH).scalar_subquery())
                )
            ).rowcount  # type: ignore[attr-defined]
        total += n
        if n < RETENTION_BATCH:
            break
    if total:
        log.info("pruned %d prediction logs older than %d days", total, days)
    return total


@celery_app.task(name="ops.retention", queue="ops")
def retention() -> dict[str, int]:
    """Everything past its retention: score runs, then jobs, then prediction logs."""
    return {
        "scoring_runs": prune_scoring_runs(),
        "jobs": prune_jobs(),
        "prediction_logs": prune_prediction_logs(),
    }
