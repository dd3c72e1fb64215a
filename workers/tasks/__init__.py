"""Task modules; importing this package registers every task with the Celery app."""

from workers import process  # noqa: F401  (per-process hooks)
from workers.tasks import (  # noqa: F401
    callbacks,
    drift,
    maintenance,
    predict,
    retention,
    score,
    train,
)
