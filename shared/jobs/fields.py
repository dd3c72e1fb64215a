"""A job, defined once: its states, types and priorities, its fields, its public view and
the two messages that carry it.

Every place that writes or shows a job takes its fields from here: the API's ``INSERT``
(``INSERTED``), the worker's claim (``CLAIMED``), the hot copy in Redis (``hot_copy``),
the done messages that wake long-polls (``done_messages`` / ``read_done_messages``), the
API's answers (``view`` with ``VIEW_FIELDS``, ``ACCEPTED_FIELDS``, ``SUMMARY_FIELDS``) and
the OpenAPI schemas of ``api.schemas`` (a test holds them to the same fields).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.orm import Job

__all__ = [
    "JobStatus",
    "JobType",
    "Priority",
    "TERMINAL",
    "JobRow",
    "CLAIMED",
    "INSERTED",
    "column_list",
    "placeholders",
    "db_values",
    "from_claimed",
    "VIEW_FIELDS",
    "ACCEPTED_FIELDS",
    "SUMMARY_FIELDS",
    "view",
    "public_view",
    "hot_copy",
    "DONE_CHANNEL",
    "LEGACY_DONE_CHANNEL",
    "DONE_PAYLOAD_MAX",
    "DONE_BATCH_MAX",
    "done_message",
    "read_done_message",
    "done_messages",
    "read_done_messages",
]


class JobStatus(StrEnum):
    """queued → running → succeeded | failed | cancelled. Terminal states never change."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobType(StrEnum):
    PREDICT = "predict"
    SCORE = "score"
    TRAIN = "train"


class Priority(StrEnum):
    """Pending predict lists are popped high first; Celery messages carry it too."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(slots=True)
class JobRow:
    """A job's columns, read or written without the ORM (the submit, a predict batch).

    ``shared.orm.Job`` has the same attribute names, so either can be passed wherever a
    job is shown (``view``, ``hot_copy``, ``shared.jobs.store.mirror``).
    """

    id: uuid.UUID
    tenant: str
    type: str
    model: str
    model_version: int | None
    status: str = JobStatus.QUEUED
    request: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] | None = None
    attempts: int = 0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    priority: str = Priority.NORMAL
    idempotency_key: str | None = None
    request_hash: str | None = None


#: The columns a claim returns, in this order (a predict batch needs no more).
CLAIMED = (
    "id",
    "tenant",
    "type",
    "model",
    "model_version",
    "status",
    "request",
    "meta",
    "attempts",
    "created_at",
    "started_at",
)
#: The columns the API's INSERT writes.
INSERTED = (
    "id",
    "tenant",
    "type",
    "model",
    "model_version",
    "status",
    "priority",
    "request",
    "meta",
    "idempotency_key",
    "request_hash",
    "attempts",
    "created_at",
)
#: Attribute -> column, where they differ (``metadata`` is taken on SQLAlchemy models).
_COLUMN = {"meta": "metadata"}
_JSON = frozenset({"request", "meta", "result", "error", "progress"})
_CAST = {"id": "uuid", "request": "jsonb", "meta": "jsonb"}


def column_list(names: Iterable[str], *, prefix: str = "") -> str:
    """SQL column names for attribute ``names``: ``id, tenant, ..., metadata, ...``."""
    return ", ".join(prefix + _COLUMN.get(n, n) for n in names)


def placeholders(names: Iterable[str]) -> str:
    """One row's ``(%s::uuid, %s, ...)`` for ``names``, with the casts the values need."""
    return "(" + ", ".join(f"%s::{_CAST[n]}" if n in _CAST else "%s" for n in names) + ")"


def db_values(job: JobRow, names: Sequence[str]) -> tuple[Any, ...]:
    """The values to bind for ``names`` (JSON columns as JSON text)."""
    out: list[Any] = []
    for name in names:
        value = getattr(job, name)
        if name == "id":
            value = str(value)
        elif name in _JSON:
            value = json.dumps(value) if value is not None else None
        out.append(value)
    return tuple(out)


def from_claimed(row: Sequence[Any]) -> JobRow:
    """A ``JobRow`` from a row of ``CLAIMED`` columns."""
    values = dict(zip(CLAIMED, row, strict=True))
    job_id = values.pop("id")
    return JobRow(job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id)), **values)


#: ``GET /v1/jobs/{id}`` (``links`` is added by the API).
VIEW_FIELDS = (
    "id",
    "type",
    "status",
    "model",
    "model_version",
    "progress",
    "result",
    "error",
    "metadata",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
)
#: The 202 of ``POST /v1/jobs`` (and the 200 of its idempotent replay).
ACCEPTED_FIELDS = ("id", "type", "status", "model", "model_version", "created_at")
#: A row of ``GET /v1/jobs``.
SUMMARY_FIELDS = ("id", "type", "status", "model", "model_version", "created_at", "finished_at")
#: View field -> attribute, where they differ.
_ATTRIBUTE = {"metadata": "meta"}


def _shown(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def view(job: Job | JobRow, names: Sequence[str] = VIEW_FIELDS) -> dict[str, Any]:
    """The job's fields ``names`` as the API shows them (ids and times as text)."""
    return {name: _shown(getattr(job, _ATTRIBUTE.get(name, name))) for name in names}


def public_view(job: Job | JobRow) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (without ``links``, added by the API)."""
    return view(job, VIEW_FIELDS)


def hot_copy(job: Job | JobRow) -> str:
    """The document kept in Redis under the job's key: its tenant and its public view."""
    return json.dumps({"tenant": job.tenant, "view": public_view(job)})


#: Redis pub/sub channel on which the jobs that reach a terminal state are announced,
#: a message per batch of them (``done_messages``).
DONE_CHANNEL = "ended"
#: The channel of earlier versions, a message per job, which ``read_done_messages`` also
#: reads: the API still listens on it, so during a rolling upgrade a worker not yet
#: upgraded wakes an upgraded API's long-polls. A batch goes on a channel of its own,
#: which an API not yet upgraded does not hear (it would take a batch for one job with a
#: hot copy it cannot parse): its long-polls wait their ``wait`` out, then read the job.
LEGACY_DONE_CHANNEL = "done"
#: Hot copies up to this size ride along in the done message.
DONE_PAYLOAD_MAX = 16 * 1024
#: A done message carries the lines of several jobs up to this size.
DONE_BATCH_MAX = 64 * 1024
_ID_LEN = 36


def done_message(job_id: uuid.UUID, doc: str) -> str:
    """``"<job id>"``, or ``"<job id> <hot copy>"`` when the copy is small enough, so a
    waiting long-poll needs no second read."""
    return f"{job_id} {doc}" if len(doc) <= DONE_PAYLOAD_MAX else str(job_id)


def read_done_message(data: bytes) -> tuple[str, bytes | None]:
    """(job id, hot copy or None) from a done message."""
    return data[:_ID_LEN].decode(), data[_ID_LEN + 1 :] or None


def done_messages(entries: Iterable[tuple[uuid.UUID, str]]) -> list[str]:
    """The done messages of several jobs (id, hot copy) that ended together: their
    ``done_message`` lines, joined by newlines into messages of at most
    ``DONE_BATCH_MAX`` characters (a line longer than that goes alone). One publish per
    batch of jobs, not per job: each message costs Redis a fan-out and every API process
    a parse. A hot copy is ``json.dumps`` output, which never holds a raw newline."""
    out: list[str] = []
    lines: list[str] = []
    size = 0
    for job_id, doc in entries:
        line = done_message(job_id, doc)
        if lines and size + 1 + len(line) > DONE_BATCH_MAX:
            out.append("\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + (1 if size else 0)
    if lines:
        out.append("\n".join(lines))
    return out


def read_done_messages(data: bytes) -> list[tuple[str, bytes | None]]:
    """Every (job id, hot copy or None) of a message from ``done_messages``."""
    return [read_done_message(line) for line in data.split(b"\n")]
