"""The Celery app of the worker and beat processes: ``shared.broker``'s, with the task
modules (``workers.tasks``) and the beat schedule (``workers.beat``)."""

from __future__ import annotations

from shared.broker import PRIORITIES, QUEUES, TASK_FOR_TYPE, celery_app
from shared.config import get_settings
from workers.beat import schedule

__all__ = ["celery_app", "QUEUES", "PRIORITIES", "TASK_FOR_TYPE"]

celery_app.conf.include = ["workers.tasks"]
celery_app.conf.beat_schedule = schedule(get_settings())
