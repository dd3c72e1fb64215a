"""/v1/jobs: submit, read (with long-poll), cancel, list."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.deps import Principal, RedisDep, SessionDep, redis_async, redis_sync, require
from api.schemas import JobAccepted, JobCreate, JobList, JobPublic, JobSummary
from api.submitter import (
    DatabaseUnavailableError,
    IdempotencyKeyTakenError,
    submitter,
)
from api.validation import request_hash, validate_job
from api.waiter import waiter
from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.jobs import store as jobstore
from shared.jobs.fields import (
    ACCEPTED_FIELDS,
    SUMMARY_FIELDS,
    TERMINAL,
    JobRow,
    JobStatus,
    JobType,
    public_view,
    view,
)
from shared.jobs.store import withdrawn_key
from shared.orm import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: Limits of the two hot routes' parameters, declared here once: the routes below and the
#: fast path (``api.fastpath``) both check them.
IDEMPOTENCY_KEY_MAX = 255
WAIT_MAX_S = 30.0
log = logging.getLogger(__name__)


def _links(job_id: Any) -> dict[str, str]:
    return {"self": f"{get_settings().public_url}/v1/jobs/{job_id}"}


def _accepted(job: Job | JobRow, *, code: int) -> JSONResponse:
    body = {**view(job, ACCEPTED_FIELDS), "links": _links(job.id)}
    return JSONResponse(body, status_code=code, headers={"Location": f"/v1/jobs/{job.id}"})


def _replay(tenant: str, key: str, digest: str | None) -> JSONResponse | None:
    """The job a retried request already created (200), or 409 if the body differs."""
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
        if job is None:
            return None
        if job.request_hash != digest:
            raise HTTPException(
                status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different body"
            )
        if job.status == JobStatus.QUEUED and redis_sync().exists(withdrawn_key(job.id)):
            _finish_withdrawal(session, job.id)
            return None  # this request records the job afresh
        return _accepted(job, code=200)


def _finish_withdrawal(session: Session, job_id: uuid.UUID) -> None:
    """A retry of a job withdrawn while Postgres was away (its first request was told 503,
    but its INSERT had committed): the withdrawal is completed here, the job deleted
    under its row lock, so the 503 stays true and the retry records a job of its own. If
    the sweeper deleted it first, there is nothing left to do."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is not None and job.status == JobStatus.QUEUED:
        session.delete(job)
    session.commit()
    redis_sync().delete(withdrawn_key(job_id))


@router.post("", status_code=202, response_model=JobAccepted)
async def submit_job(
    body: JobCreate,
    principal: Annotated[Principal, require("jobs:write")],
    idempotency_key: Annotated[str | None, Header(max_length=IDEMPOTENCY_KEY_MAX)] = None,
) -> JSONResponse:
    """Record the job in Postgres, put it on the broker, answer 202 with its id.

    The record and the message are written together with those of concurrent requests
    (see ``api.submitter``); the 202 goes out only after both.
    """
    return await submit(body, principal, idempotency_key)


async def submit(
    body: JobCreate, principal: Principal, idempotency_key: str | None
) -> JSONResponse:
    """The work of ``POST /v1/jobs`` (also served by ``api.fastpath``)."""
    if body.type == JobType.TRAIN and "models:admin" not in principal.scopes:
        # A train job registers a version and may promote it for every tenant.
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "train jobs create and promote model versions: this key lacks the 'models:admin' scope",
        )
    # The body's hash only matters to tell a retry from a different request with its key.
    digest = request_hash(body) if idempotency_key else None
    if idempotency_key:
        replay = await run_in_threadpool(_replay, principal.tenant, idempotency_key, digest)
        if replay is not None:
            return replay
    version, request = await validate_job(body, get_settings().max_rows, principal.tenant)
    job = JobRow(
        id=uuid.uuid4(),
        tenant=principal.tenant,
        type=body.type,
        model=body.model,
        model_version=version,
        priority=body.priority,
        request=request,
        meta=body.metadata,
        request_hash=digest,
        created_at=datetime.now(UTC),
        idempotency_key=idempotency_key,
    )
    try:
        await submitter.submit(job)
    except IdempotencyKeyTakenError:
        # A concurrent request with the same key won the race.
        replay = await run_in_threadpool(_replay, principal.tenant, idempotency_key or "", digest)
        if replay is None:  # the job that held the key was withdrawn meanwhile
            raise DatabaseUnavailableError("the job holding this key was withdrawn") from None
        return replay
    log.debug("accepted %s job", job.type, extra={"job_id": str(job.id)})
    return _accepted(job, code=202)


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found") from None


def _read_ledger(job_id: uuid.UUID, tenant: str) -> dict[str, Any] | None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
        return public_view(job) if job is not None else None


async def _read_hot(job_id: uuid.UUID) -> dict[str, Any] | None:
    raw = await redis_async().get(get_settings().key("job", job_id))
    return json.loads(raw) if raw is not None else None


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    principal: Annotated[Principal, require("jobs:read")],
    wait: Annotated[
        float, Query(ge=0, le=WAIT_MAX_S, description="Long-poll up to this many s.")
    ] = 0,
) -> JSONResponse:
    """The job; with ``?wait=`` the answer comes as soon as it ends, or after ``wait`` s.

    Terminal jobs are answered from Redis. A job still queued or running is read from
    Postgres, the record (progress lives there), except that a long-poll on a job whose
    hot copy exists waits for the done channel without touching Postgres.
    """
    return await read_job(job_id, principal, wait)


async def read_job(job_id: str, principal: Principal, wait: float) -> JSONResponse:
    """The work of ``GET /v1/jobs/{id}`` (also served by ``api.fastpath``)."""
    jid = _parse_id(job_id)
    key = str(jid)
    tenant = principal.tenant
    with waiter.watch(key) as ended:
        # Watching before looking: an end that lands from here on still wakes us.
        owner, seen = waiter.recall(key)
        doc = json.loads(seen) if seen is not None else None
        if doc is None and not (owner is not None and wait > 0):
            doc = await _read_hot(jid)
        if (doc is not None and doc["tenant"] != tenant) or owner not in (None, tenant):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
        view = doc["view"] if doc is not None else None
        if view is None or view["status"] not in TERMINAL:
            if wait == 0 or (view is None and owner is None):
                view = await run_in_threadpool(_read_ledger, jid, tenant)
                if view is None:
                    raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
            if wait > 0 and (view is None or view["status"] not in TERMINAL):
                woke = await ended(wait)
                if isinstance(woke, bytes):
                    doc = json.loads(woke)
                else:
                    doc = await _read_hot(jid) if woke else None
                if doc is not None and doc["view"]["status"] in TERMINAL:
                    view = doc["view"]
                else:
                    view = await run_in_threadpool(_read_ledger, jid, tenant) or view
    if view is None:  # accepted here, yet gone from the ledger (withdrawn)
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    return JSONResponse({**view, "links": _links(jid)})


@router.delete("/{job_id}", response_model=JobPublic)
def cancel_job(
    job_id: str,
    session: SessionDep,
    redis: RedisDep,
    principal: Annotated[Principal, require("jobs:write")],
) -> JobPublic:
    """Cancel a queued or running job; 409 once it has ended."""
    jid = _parse_id(job_id)
    job, changed = jobstore.cancel(session, jid, tenant=principal.tenant)
    session.commit()
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    if not changed:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job already {job.status}")
    jobstore.mirror(redis, [job])
    return JobPublic(**public_view(job), links=_links(jid))


@router.get("/{job_id}/result.csv", response_class=StreamingResponse)
def score_result_csv(
    job_id: str,
    session: SessionDep,
    principal: Annotated[Principal, require("jobs:read")],
) -> StreamingResponse:
    """A score job's rows (entity_id, score, label), streamed from Postgres."""
    jid = _parse_id(job_id)
    job = session.scalar(select(Job).where(Job.id == jid, Job.tenant == principal.tenant))
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    if job.type != JobType.SCORE:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "only score jobs have result.csv")
    if job.status != JobStatus.SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {job.status}; no rows yet")
    return StreamingResponse(
        _stream_rows(jid),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{jid}.csv"'},
    )


def _stream_rows(run_id: uuid.UUID, batch: int = 20_000) -> Iterator[str]:
    raw = get_engine().raw_connection()
    try:
        cur = raw.cursor(name=f"csv_{run_id.hex}")  # server-side: constant memory
        cur.itersize = batch  # type: ignore[attr-defined]
        cur.execute(
            "SELECT entity_id, score, label FROM predictions WHERE run_id = %s ORDER BY entity_id",
            (str(run_id),),
        )
        yield "entity_id,score,label\n"
        while rows := cur.fetchmany(batch):
            yield "".join(
                f"{e},{s!r},{'' if lab is None else str(lab).lower()}\n" for e, s, lab in rows
            )
        raw.rollback()
    finally:
        raw.close()


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, jid = raw.split("|")
        return datetime.fromisoformat(ts), uuid.UUID(jid)
    except ValueError:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ["query", "cursor"], "msg": "invalid cursor"}]
        ) from None


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    principal: Annotated[Principal, require("jobs:read")],
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    type_: Annotated[JobType | None, Query(alias="type")] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> JobList:
    """The tenant's jobs, newest first, ``limit`` at a time."""
    q = select(Job).where(Job.tenant == principal.tenant)
    if status_ is not None:
        q = q.where(Job.status == status_)
    if type_ is not None:
        q = q.where(Job.type == type_)
    if model is not None:
        q = q.where(Job.model == model)
    if cursor:
        ts, jid = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < ts, and_(Job.created_at == ts, Job.id < jid)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    return JobList(
        items=[JobSummary(**view(j, SUMMARY_FIELDS), links=_links(j.id)) for j in page],
        next_cursor=_encode_cursor(page[-1]) if more else None,
    )
