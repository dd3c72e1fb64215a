"""Retention (``ops.retention``, hourly): jobs, prediction logs and score runs past their
``INFERQ_*_RETENTION_DAYS`` are deleted in batches; a score run's rows go with its
partition, dropped whole; each tenant's latest run of a model is kept."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, exists, select

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import Job, PredictionLog, ScoringRun
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
        latest = (
            select(ScoringRun.id)
            .join(Job, Job.id == ScoringRun.job_id)
            .where(ScoringRun.status == "succeeded")
            .order_by(ScoringRun.model, Job.tenant, ScoringRun.finished_at.desc())
            .distinct(ScoringRun.model, Job.tenant)
        )
        runs = session.execute(
            select(ScoringRun.id, ScoringRun.job_id)
            .join(Job, Job.id == ScoringRun.job_id)
            .where(Job.finished_at < _cutoff(days), ScoringRun.id.not_in(latest))
        ).all()
    for run_id, job_id in runs:
        drop_partition(run_id)
        with session_scope() as session:
            session.execute(delete(Job).where(Job.id == job_id))
    if runs:
        log.info("dropped %d score runs older than %d days", len(runs), days)
    return len(runs)


def _in_batches(table: Any, old: Select[Any]) -> int:
    """Delete the rows of ``table`` whose id ``old`` selects, ``RETENTION_BATCH`` a
    transaction, until a batch comes back short; returns how many."""
    total = 0
    while True:
        with session_scope() as session:
            n = session.execute(
                delete(table)
                .where(table.id.in_(old.limit(RETENTION_BATCH).scalar_subquery()))
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
        total += n
        if n < RETENTION_BATCH:
            return total


def prune_jobs(days: int | None = None) -> int:
    """Jobs that ended more than ``INFERQ_JOB_RETENTION_DAYS`` ago (their callback
    deliveries go with them), in batches; a score job goes with its run, above."""
    days = get_settings().job_retention_days if days is None else days
    cutoff = _cutoff(days)
    old = select(Job.id).where(
        Job.created_at < cutoff,
        Job.finished_at < cutoff,
        ~exists().where(ScoringRun.job_id == Job.id),
    )
    total = _in_batches(Job, old)
    if total:
        log.info("pruned %d jobs older than %d days", total, days)
    return total


def prune_prediction_logs(days: int | None = None) -> int:
    """Prediction logs older than ``INFERQ_PREDICTION_LOG_RETENTION_DAYS``, in batches."""
    days = get_settings().prediction_log_retention_days if days is None else days
    old = select(PredictionLog.id).where(PredictionLog.created_at < _cutoff(days))
    total = _in_batches(PredictionLog, old)
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
