"""``ops.callback``: POST an ended job's public view to the URL it gave, from the outbox.

The delivery row (``callback_deliveries``) was written in the transaction that ended the
job. An attempt first takes the row for a lease (a second message for it finds it taken
and does nothing), then POSTs, then records the outcome on the row: delivered, given up,
or due again after a backoff (1 s, 2 s, 4 s ... 5 min; ``MAX_ATTEMPTS`` in all). The
sweeper sends whatever is due, so a message lost with Redis, a worker killed mid-POST or a
retry that is due are all picked up again: at least once. (A retry is also sent as a
message with a countdown, so it does not wait for the next sweep.) Every attempt carries the same
``X-Inferq-Delivery`` id, for the receiver to de-duplicate on.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import Row, func, or_, select, update
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.db import session_scope
from shared.jobs.callbacks import CallbackRefusedError, check_url, pinned, signature
from shared.jobs.fields import public_view
from shared.logs import job_context
from shared.orm import CallbackDelivery, Job
from workers.app import celery_app

__all__ = ["callback", "due_deliveries", "MAX_ATTEMPTS"]

log = logging.getLogger(__name__)

#: Attempts before a delivery is given up (the last about 8 minutes after the first).
MAX_ATTEMPTS = 9
BACKOFF_MAX_S = 300
#: An attempt holds its delivery this long; past it (its worker died) it is due again.
LEASE_S = 60
HTTP_TIMEOUT_S = 10

# A new delivery (attempts 0) may be taken at once by the message sent when its job ended;
# afterwards only when due. Under the row lock the second of two messages sees attempts
# already counted and takes nothing.
_OWED = (CallbackDelivery.delivered_at.is_(None), CallbackDelivery.gave_up_at.is_(None))


def _take(session: Session, job_id: str) -> Row[uuid.UUID, str, int] | None:
    return session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.job_id == uuid.UUID(job_id),
            *_OWED,
            or_(CallbackDelivery.attempts == 0, CallbackDelivery.next_at <= func.now()),
        )
        .values(
            attempts=CallbackDelivery.attempts + 1,
            next_at=func.now() + timedelta(seconds=LEASE_S),
        )
        .returning(CallbackDelivery.id, CallbackDelivery.url, CallbackDelivery.attempts)
    ).first()


def _record(session: Session, delivery: str, **values: Any) -> None:
    session.execute(
        update(CallbackDelivery).where(CallbackDelivery.id == uuid.UUID(delivery)).values(**values)
    )


@celery_app.task(name="ops.callback", queue="ops", soft_time_limit=30, time_limit=40)
def callback(job_id: str) -> str:
    """One attempt at the job's delivery, if it is owed and nobody else holds it."""
    s = get_settings()
    with job_context(job_id), session_scope() as session:
        taken = _take(session, job_id)
        if taken is None:
            return "nothing owed"
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None  # the delivery references it
        view = {**public_view(job), "links": {"self": f"{s.public_url}/v1/jobs/{job_id}"}}
    delivery, url, attempt = str(taken.id), taken.url, int(taken.attempts)
    with job_context(job_id):
        status, error, retry = _post(url, view, delivery=delivery, job_id=job_id, attempt=attempt)
        now = func.now()
        with session_scope() as session:
            if error is not None and not retry:
                _record(session, delivery, gave_up_at=now, last_status=status, last_error=error)
                log.error("callback to %s given up: %s", url, error or status)
                return "given up"
            if error is None:
                _record(session, delivery, delivered_at=now, last_status=status, last_error=None)
                log.info("callback delivered to %s: %s", url, status)
                return "delivered"
            if attempt >= MAX_ATTEMPTS:
                _record(session, delivery, gave_up_at=now, last_status=status, last_error=error)
                log.error("callback to %s given up after %d attempts: %s", url, attempt, error)
                return "given up"
            after = min(2 ** (attempt - 1), BACKOFF_MAX_S)
            _record(
                session,
                delivery,
                next_at=now + timedelta(seconds=after),
                last_status=status,
                last_error=error,
            )
        log.warning("callback to %s failed (%s); again in %d s", url, error, after)
        # A message for when it is due (a little after, so the row is due by then); the
        # sweeper sends another if this one is lost.
        callback.apply_async(args=[job_id], countdown=after + 0.5, queue="ops")
        return "retry"


def _post(
    url: str, view: dict, *, delivery: str, job_id: str, attempt: int
) -> tuple[int | None, str | None, bool]:
    """(HTTP status or None, error or None, worth another try): network errors, 429 and
    5xx are retried; a refused URL and any other 4xx are final."""
    s = get_settings()
    try:
        addresses = check_url(url, allow_private=s.callback_allow_private)
    except CallbackRefusedError as exc:
        return None, f"refused: {exc}", False
    # The request goes to the address just checked, not to a second lookup's answer.
    target, pin_headers, extensions = pinned(url, addresses[0])
    body = json.dumps(view).encode()
    headers = {
        "content-type": "application/json",
        "user-agent": "inferq-callback",
        "x-inferq-job-id": job_id,
        "x-inferq-delivery": delivery,
        "x-inferq-attempt": str(attempt),
    }
    if s.callback_secret:
        headers["x-inferq-signature"] = signature(s.callback_secret, body)
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            response = client.post(
                target, content=body, headers={**headers, **pin_headers}, extensions=extensions
            )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500], True
    code = response.status_code
    if code >= 400:
        return code, f"answered {code}", code == 429 or code >= 500
    return code, None, False


def due_deliveries(limit: int = 1000) -> list[str]:
    """Job ids of deliveries due now: new ones whose message was lost, retries whose
    backoff has passed, attempts whose worker died."""
    with session_scope() as session:
        due = session.scalars(
            select(CallbackDelivery.job_id)
            .where(*_OWED, CallbackDelivery.next_at <= func.now())
            .order_by(CallbackDelivery.next_at)
            .limit(limit)
        )
        return [str(job_id) for job_id in due]
