"""/v1/jobs: submit, read (with long-poll), cancel, list."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from sqlalchemy import and_, delete, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import Principal, RedisDep, SessionDep, SettingsDep, redis_async, require
from api.registry_view import VersionInfo, registry_view
from api.schemas import JobAccepted, JobCreate, JobList, JobPublic, JobSummary
from api.waiter import waiter
from shared import jobs as jobstore
from shared.catalog import SPECS
from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.inputs import validate_rows
from shared.jobs import TERMINAL, JobStatus
from shared.orm import Job
from shared.scoring import validate_segment
from workers.dispatch import enqueue

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger(__name__)


class BrokerUnavailableError(RuntimeError):
    """The job could not be put on the broker; it was withdrawn and the client gets a 503."""


def _links(job_id: Any) -> dict[str, str]:
    return {"self": f"{get_settings().public_url}/v1/jobs/{job_id}"}


def _invalid(field: str | tuple[Any, ...], msg: str, kind: str = "value_error") -> None:
    loc = ["body", *(field if isinstance(field, tuple) else (field,))]
    raise RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": None}])


def _too_large(field: str, msg: str) -> None:
    raise HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        [{"type": "too_long", "loc": ["body", field], "msg": msg}],
    )


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _not_for(body: JobCreate, job_type: str, *fields: str) -> None:
    for f in fields:
        if getattr(body, f) is not None:
            _invalid(f, f"'{f}' is not accepted for {job_type} jobs")


def _validate_predict(session: Session, body: JobCreate, info: VersionInfo, max_rows: int) -> dict:
    _not_for(body, "predict", "segment", "promote")
    if (body.inputs is None) == (body.entity_ids is None):
        _invalid("inputs", "give exactly one of 'inputs' or 'entity_ids'", "missing")
    field = "inputs" if body.inputs is not None else "entity_ids"
    rows: list[Any] = body.inputs if body.inputs is not None else body.entity_ids  # type: ignore
    if not rows:
        _invalid(field, f"'{field}' must hold at least one row", "too_short")
    if len(rows) > max_rows:
        _too_large(field, f"{len(rows)} rows; at most {max_rows} per job (INFERQ_MAX_ROWS)")
    if body.inputs is not None:
        errors = validate_rows(body.inputs, info.schema)
        if errors:
            raise RequestValidationError(errors)
        return {"inputs": body.inputs}
    table = info.schema.get("entity_table")
    if table != "customers":
        _invalid("entity_ids", f"model {info.name!r} has no feature table; send 'inputs'")
    ids = list(dict.fromkeys(body.entity_ids or []))
    known = set(
        session.scalars(text("SELECT id FROM customers WHERE id = ANY(:ids)"), {"ids": ids})
    )
    unknown = [(i, e) for i, e in enumerate(body.entity_ids or []) if e not in known]
    if unknown:
        raise RequestValidationError(
            [
                {
                    "type": "unknown_entity",
                    "loc": ["body", "entity_ids", i],
                    "msg": f"unknown entity id {e}",
                    "input": e,
                }
                for i, e in unknown[:50]
            ]
        )
    return {"entity_ids": body.entity_ids}


def _validate(session: Session, body: JobCreate, max_rows: int) -> tuple[int | None, dict]:
    """(model version, request to store) or a 413/422 naming the field."""
    if body.callback_url is not None:
        _invalid("callback_url", "callbacks are not supported yet; poll GET /v1/jobs/{id}")
    if body.type == "train":
        _not_for(body, "train", "inputs", "entity_ids", "segment", "version")
        if body.model not in SPECS:
            _invalid("model", f"unknown trainable model {body.model!r}; known: {sorted(SPECS)}")
        return None, {"promote": body.promote or "if_better"}
    resolved = registry_view.resolve(session, body.model, body.version)
    if isinstance(resolved, tuple):
        _invalid(resolved[0], resolved[1])
    assert isinstance(resolved, VersionInfo)
    if body.type == "score":
        return resolved.version, _validate_score(body, resolved)
    return resolved.version, _validate_predict(session, body, resolved, max_rows)


def _validate_score(body: JobCreate, info: VersionInfo) -> dict:
    _not_for(body, "score", "inputs", "entity_ids", "promote")
    if info.schema.get("entity_table") != "customers":
        _invalid("model", f"model {info.name!r} has no feature table to score")
    segment = body.segment or {}
    errors = validate_segment(segment, info.schema)
    if errors:
        raise RequestValidationError(errors)
    return {"segment": segment}


def _accepted(job: Job) -> JobAccepted:
    return JobAccepted(
        id=str(job.id),
        type=job.type,
        status=job.status,
        model=job.model,
        model_version=job.model_version,
        created_at=job.created_at.isoformat() if job.created_at else None,
        links=_links(job.id),
    )


def _replay(session: Session, tenant: str, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different body"
        )
    return job


@router.post("", status_code=202, response_model=JobAccepted)
def submit_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: Annotated[Principal, require("jobs:write")],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobAccepted:
    """Record the job in Postgres, put it on the broker, answer 202 with its id."""
    digest = _request_hash(body)
    if idempotency_key:
        existing = _replay(session, principal.tenant, idempotency_key, digest)
        if existing is not None:
            response.status_code = status.HTTP_200_OK
            return _accepted(existing)
    version, request = _validate(session, body, settings.max_rows)
    job = Job(
        id=uuid.uuid4(),
        tenant=principal.tenant,
        type=body.type,
        model=body.model,
        model_version=version,
        status=JobStatus.QUEUED,
        priority=body.priority,
        request=request,
        meta=body.metadata,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with one Idempotency-Key raced; the first one won.
        session.rollback()
        existing = _replay(session, principal.tenant, idempotency_key or "", digest)
        if existing is None:
            raise
        response.status_code = status.HTTP_200_OK
        return _accepted(existing)
    try:
        enqueue([(job.id, job.type, job.priority)])
    except Exception as exc:
        # Not on the broker: withdraw the job so a 503 never hides an accepted one.
        log.error("broker unavailable, withdrawing job %s: %s", job.id, exc)
        try:
            with session_scope() as s2:
                s2.execute(delete(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED))
        except Exception:
            log.exception("could not withdraw job %s; the sweeper will send it", job.id)
        raise BrokerUnavailableError(str(exc)) from exc
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    log.info("accepted %s job", job.type, extra={"job_id": str(job.id)})
    return _accepted(job)


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found") from None


def _read_ledger(job_id: uuid.UUID, tenant: str) -> dict[str, Any] | None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
        return jobstore.public_view(job) if job is not None else None


async def _read(job_id: uuid.UUID, tenant: str) -> dict[str, Any] | None:
    """Terminal jobs from Redis; anything else (or a cold cache) from Postgres, the record."""
    raw = await redis_async().get(get_settings().key("job", job_id))
    if raw is not None:
        doc = json.loads(raw)
        if doc["tenant"] != tenant:
            return None
        if doc["view"]["status"] in TERMINAL:
            return doc["view"]
    return await run_in_threadpool(_read_ledger, job_id, tenant)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    principal: Annotated[Principal, require("jobs:read")],
    wait: Annotated[float, Query(ge=0, le=30, description="Long-poll up to this many s.")] = 0,
) -> JobPublic:
    """The job; with ``?wait=`` the answer comes as soon as it ends, or after ``wait`` s."""
    jid = _parse_id(job_id)
    with waiter.watch(str(jid)) as ended:
        view = await _read(jid, principal.tenant)
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
        if wait > 0 and view["status"] not in TERMINAL and await ended(wait):
            view = await _read(jid, principal.tenant) or view
    return JobPublic(**view, links=_links(jid))


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
    return JobPublic(**jobstore.public_view(job), links=_links(jid))


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
    if job.type != "score":
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
        cur.itersize = batch
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
    type_: Annotated[str | None, Query(alias="type", pattern="^(predict|score|train)$")] = None,
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
        items=[
            JobSummary(
                id=str(j.id),
                type=j.type,
                status=j.status,
                model=j.model,
                model_version=j.model_version,
                created_at=j.created_at.isoformat(),
                finished_at=j.finished_at.isoformat() if j.finished_at else None,
                links=_links(j.id),
            )
            for j in page
        ],
        next_cursor=_encode_cursor(page[-1]) if more else None,
    )
