"""The beat schedule, in one place. ``inferq beat`` runs it; exactly one beat should run."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from shared.config import Settings

__all__ = ["schedule"]


def _cron(expr: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = expr.split()
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def schedule(s: Settings) -> dict[str, dict[str, Any]]:
    return {
        # Re-sends jobs recorded but not on the broker (crash between commit and publish,
        # a Redis restart that dropped the queue) and running jobs whose lease ran out.
        "sweep-stuck-jobs": {
            "task": "ops.sweep",
            "schedule": s.sweep_every_s,
            "options": {"queue": "ops", "expires": s.sweep_every_s},
        },
        # Every model with a feature table re-scores its whole table each night; a unique
        # key per model and night in Postgres makes a second beat (or a retry) a no-op.
        "nightly-scoring": {
            "task": "ops.nightly_score",
            "schedule": _cron(s.nightly_score_cron),
            "options": {"queue": "ops"},
        },
        # Models that follow an MLflow alias (inferq models follow): a moved alias is
        # imported and promoted.
        "mlflow-sync": {
            "task": "ops.mlflow_sync",
            "schedule": s.mlflow_poll_s,
            "options": {"queue": "ops", "expires": s.mlflow_poll_s},
        },
        "prune-prediction-logs": {
            "task": "ops.prune_prediction_logs",
            "schedule": _cron("17 3 * * *"),
            "options": {"queue": "ops"},
        },
    }
