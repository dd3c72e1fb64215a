"""``ops.drift`` (beat, every ``INFERQ_DRIFT_EVERY_S``): an online drift report for every
production version with a reference profile, stored and published as metrics."""

from __future__ import annotations

import logging

from shared.db import session_scope
from shared.monitoring.reports import publish, report_all
from workers.app import celery_app
from workers.process import redis_client

__all__ = ["drift"]

log = logging.getLogger(__name__)


@celery_app.task(name="ops.drift", queue="ops")
def drift() -> int:
    """Returns how many reports flagged drift."""
    with session_scope() as session:
        reports = report_all(session)
    flagged = 0
    for report in reports:
        publish(redis_client(), report)
        if report.drifted:
            flagged += 1
            names = [f["feature"] for f in report.features if f.get("drifted")]
            log.warning(
                "drift: %s v%s, %d rows: %s",
                report.model,
                report.version,
                report.rows_window,
                ", ".join(names) or "the score distribution",
            )
    return flagged
