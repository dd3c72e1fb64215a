"""The beat schedule, in one place. ``inferq beat`` runs it; exactly one beat should run."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery.schedules import crontab
from celery.signals import beat_init

from shared.config import Settings

__all__ = ["schedule", "last_fire"]


def last_fire(expr: str, now: datetime) -> datetime | None:
    """The latest minute at or before ``now`` that the cron ``expr`` fires on (within the
    last eight days), or None."""
    c = _cron(expr)
    t = now.replace(second=0, microsecond=0)
    for _ in range(8 * 24 * 60):
        if (
            t.minute in c.minute
            and t.hour in c.hour
            and t.day in c.day_of_month
            and t.month in c.month_of_year
            and t.isoweekday() % 7 in c.day_of_week  # crontab counts from Sunday = 0
        ):
            return t
        t -= timedelta(minutes=1)
    return None


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
        # Each production version's online traffic against its reference profile.
        "drift": {
            "task": "ops.drift",
            "schedule": s.drift_every_s,
            "options": {"queue": "ops", "expires": s.drift_every_s},
        },
        # Jobs, score runs (their partitions dropped whole) and prediction logs past
        # their retention; hourly, so each pass is small.
        "retention": {
            "task": "ops.retention",
            "schedule": _cron("17 * * * *"),
            "options": {"queue": "ops", "expires": 3000},
        },
    }


@beat_init.connect
def _catch_up(sender: Any = None, **_: object) -> None:
    """At every beat start: the last nightly run, if its trigger was lost (beat down at the
    time, or its message dropped by a Redis restart), is recorded now; one that exists is
    left alone (``ops.nightly_catch_up``)."""
    from shared.config import get_settings

    if get_settings().nightly_catch_up:
        app = getattr(sender, "app", None)
        if app is not None:
            app.send_task("ops.nightly_catch_up", queue="ops")
