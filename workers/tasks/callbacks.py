"""``ops.callback``: POST an ended job's public view to the URL it gave."""

from __future__ import annotations

import json
import logging
import uuid

import httpx

from shared.callbacks import CallbackRefusedError, check_url, pinned, signature
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs import public_view
from shared.logs import job_context
from shared.orm import Job
from workers.app import celery_app

log = logging.getLogger(__name__)


class CallbackFailedError(RuntimeError):
    """The receiver answered 429 or 5xx: worth another try later."""


@celery_app.task(
    name="ops.callback",
    bind=True,
    queue="ops",
    # Network errors and 5xx are retried with exponential backoff (1 s, 2 s, ... 5 min);
    # a 4xx is the receiver's final word.
    autoretry_for=(httpx.TransportError, CallbackFailedError),
    retry_backoff=True,
    retry_backoff_max=300,
    retry_jitter=False,
    max_retries=8,
    soft_time_limit=30,
    time_limit=40,
)
def callback(self, job_id: str) -> int | str:  # type: ignore[no-untyped-def]
    s = get_settings()
    with job_context(job_id), session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        if job is None or not (job.request or {}).get("callback_url"):
            return "nothing to send"
        url = job.request["callback_url"]
        view = {**public_view(job), "links": {"self": f"{s.public_url}/v1/jobs/{job_id}"}}
    with job_context(job_id):
        try:
            addresses = check_url(url, allow_private=s.callback_allow_private)
        except CallbackRefusedError as exc:
            log.error("callback refused: %s", exc)
            return "refused"
        # The request goes to the address just checked, not to a second lookup's answer.
        target, pin_headers, extensions = pinned(url, addresses[0])
        body = json.dumps(view).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "inferq-callback",
            "x-inferq-job-id": job_id,
            "x-inferq-attempt": str(self.request.retries + 1),
        }
        if s.callback_secret:
            headers["x-inferq-signature"] = signature(s.callback_secret, body)
        with httpx.Client(timeout=10) as client:
            response = client.post(
                target, content=body, headers={**headers, **pin_headers}, extensions=extensions
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise CallbackFailedError(f"{url} answered {response.status_code}")
        log.info("callback delivered to %s: %s", url, response.status_code)
        return response.status_code
