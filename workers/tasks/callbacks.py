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

import httpx
from sqlalchemy import text

from shared.config import get_settings
from shared.db import session_scope
from shared.jobs.callbacks import CallbackRefusedError, check_url, pinned, signature
from shared.jobs.fields import public_view
from shared.logs import job_context
from shared.orm import Job
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
_TAKE = text(
    f"""UPDATE callback_deliveries
    SET attempts = attempts + 1, next_at = now() + interval '{LEASE_S} seconds'
    WHERE job_id = :job AND delivered_at IS NULL AND gave_up_at IS NULL
      AND (attempts = 0 OR next_at <= now())
    RETURNING id, url, attempts"""
)
_DELIVERED = text(
    "UPDATE callback_deliveries SET delivered_at = now(), last_status = :status, "
    "last_error = NULL WHERE id = :id"
)
_GAVE_UP = text(
    "UPDATE callback_deliveries SET gave_up_at = now(), last_status = :status, "
    "last_error = :error WHERE id = :id"
)
_AGAIN = text(
    "UPDATE callback_deliveries SET next_at = now() + make_interval(secs => :after), "
    "last_status = :status, last_error = :error WHERE id = :id"
)
_DUE = text(
    "SELECT job_id FROM callback_deliveries "
    "WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_at <= now() "
    "ORDER BY next_at LIMIT :limit"
)


@celery_app.task(name="ops.callback", queue="ops", soft_time_limit=30, time_limit=40)
def callback(job_id: str) -> str:
    """One attempt at the job's delivery, if it is owed and nobody else holds it."""
    s = get_settings()
    with job_context(job_id), session_scope() as session:
        taken = session.execute(_TAKE, {"job": job_id}).first()
        if taken is None:
            return "nothing owed"
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None  # the delivery references it
        view = {**public_view(job), "links": {"self": f"{s.public_url}/v1/jobs/{job_id}"}}
    delivery, url, attempt = str(taken.id), taken.url, int(taken.attempts)
    with job_context(job_id):
        status, error, retry = _post(url, view, delivery=delivery, job_id=job_id, attempt=attempt)
        with session_scope() as session:
            if error is not None and not retry:
                session.execute(_GAVE_UP, {"id": delivery, "status": status, "error": error})
                log.error("callback to %s given up: %s", url, error or status)
                return "given up"
            if error is None:
                session.execute(_DELIVERED, {"id": delivery, "status": status})
                log.info("callback delivered to %s: %s", url, status)
                return "delivered"
            if attempt >= MAX_ATTEMPTS:
                session.execute(_GAVE_UP, {"id": delivery, "status": status, "error": error})
                log.error("callback to %s given up after %d attempts: %s", url, attempt, error)
                return "given up"
            after = min(2 ** (attempt - 1), BACKOFF_MAX_S)
            session.execute(
                _AGAIN, {"id": delivery, "after": after, "status": status, "error": error}
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
        return [str(r.job_id) for r in session.execute(_DUE, {"limit": limit})]
