"""Structured logging: one JSON object a line, carrying the job id of the work in hand."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

__all__ = ["configure_logging", "job_context", "current_job_id"]

current_job_id: ContextVar[str | None] = ContextVar("inferq_job_id", default=None)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get()
        return True


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the stream it was
    when logging was set up (a test runner's capture, say, is closed before exit)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(*, level: str = "INFO", json_lines: bool = True, process: str = "") -> None:
    """Route every logger (ours, Celery's, uvicorn's) through one structured handler."""
    handler = _Stderr()
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(process)d",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
                static_fields={"service": process} if process else None,
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [job=%(job_id)s] %(message)s")
        )
    handler.addFilter(_JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # warnings too, as log lines of their own
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def job_context(job_id: object) -> Iterator[None]:
    """Tag every log line emitted inside the block with ``job_id``."""
    token = current_job_id.set(str(job_id))
    try:
        yield
    finally:
        current_job_id.reset(token)
