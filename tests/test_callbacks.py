"""Callbacks: an ended job's view is POSTed, signed, to its callback_url, with retries."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shared.jobs.callbacks import CallbackRefusedError, check_url
from tests.conftest import ROW, Stack, record_queued, start_api, submit, wait_done, wait_for


class Receiver:
    """A real HTTP server on loopback that records what it is sent."""

    def __init__(self, answers: list[int]) -> None:
        self.received: list[tuple[dict, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(
                    (dict(self.headers), json.loads(body) | {"_raw": body.decode()})
                )
                code = answers.pop(0) if answers else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    r = Receiver([])
    yield r
    r.close()


def test_ended_job_is_posted_signed_to_its_callback(
    stack: Stack, client: httpx.Client, receiver: Receiver
) -> None:
    job_id = submit(client, inputs=[ROW], callback_url=receiver.url).json()["id"]
    job = wait_done(client, job_id)
    wait_for(lambda: receiver.received, 20, "the callback")
    headers, body = receiver.received[0]
    assert body["id"] == job_id and body["status"] == "succeeded"
    assert body["result"] == job["result"]
    assert headers["x-inferq-job-id"] == job_id
    expected = hmac.new(
        os.environ["INFERQ_CALLBACK_SECRET"].encode(), body["_raw"].encode(), hashlib.sha256
    ).hexdigest()
    assert headers["x-inferq-signature"] == f"sha256={expected}"
    time.sleep(0.5)
    assert len(receiver.received) == 1  # delivered once


def test_a_failing_receiver_is_retried(stack: Stack, client: httpx.Client) -> None:
    flaky = Receiver([503, 200])
    try:
        job_id = submit(client, inputs=[ROW], callback_url=flaky.url).json()["id"]
        wait_done(client, job_id)
        wait_for(lambda: len(flaky.received) >= 2, 30, "the retried callback", step=0.1)
        attempts = [h["x-inferq-attempt"] for h, _ in flaky.received]
        assert attempts == ["1", "2"]
        assert all(b["id"] == job_id for _, b in flaky.received)
        # One delivery, one id on every attempt: what a receiver de-duplicates on.
        deliveries = {h["x-inferq-delivery"] for h, _ in flaky.received}
        row = wait_for(lambda: _delivery(job_id, delivered=True), 10, "the delivered row")
        assert deliveries == {str(row["id"])}
        assert row["attempts"] == 2 and row["last_status"] == 200
    finally:
        flaky.close()


def test_cancelled_jobs_call_back_too(
    stack: Stack, client: httpx.Client, receiver: Receiver
) -> None:
    job_id = record_queued(client, {"inputs": [ROW], "callback_url": receiver.url})
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    wait_for(lambda: receiver.received, 20, "the callback")
    assert receiver.received[0][1]["status"] == "cancelled"


def test_internal_callback_hosts_are_refused_by_default(stack: Stack) -> None:
    from tests.conftest import make_client

    api, url = start_api({"INFERQ_CALLBACK_ALLOW_PRIVATE": "false"})
    try:
        with make_client(stack, base_url=url) as c:
            for bad in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/"):
                r = submit(c, inputs=[ROW], callback_url=bad)
                assert r.status_code == 422
                (err,) = r.json()["detail"]
                assert err["loc"] == ["body", "callback_url"] and "internal" in err["msg"]
    finally:
        api.stop()


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "http:///nohost"])
def test_callback_urls_must_be_http(url: str) -> None:
    with pytest.raises(CallbackRefusedError):
        check_url(url, allow_private=True)


def test_names_are_checked_after_resolution() -> None:
    import socket

    host = socket.gethostname()  # resolves to a loopback or private address on a dev box
    with pytest.raises(CallbackRefusedError, match="internal"):
        check_url(f"http://{host}:8080/x", allow_private=False)
    check_url(f"http://{host}:8080/x", allow_private=True)


def _delivery(job_id: str, *, delivered: bool = False) -> dict | None:
    from sqlalchemy import text

    from shared.db import session_scope

    with session_scope() as session:
        row = session.execute(
            text("SELECT * FROM callback_deliveries WHERE job_id = :j"), {"j": job_id}
        ).first()
    if row is None or (delivered and row.delivered_at is None):
        return None
    return dict(row._mapping)


def test_a_callback_whose_message_was_lost_is_sent_from_the_outbox(
    stack: Stack, client: httpx.Client, receiver: Receiver
) -> None:
    """The job's end and its delivery commit together; a worker that dies before sending
    the message (here: the end is written by hand, so no message goes) loses nothing,
    the sweeper sends what is due."""
    from sqlalchemy import text

    from shared.db import session_scope
    from workers.tasks.maintenance import resend_callbacks

    job_id = record_queued(client, {"inputs": [ROW], "callback_url": receiver.url})
    with session_scope() as session:
        session.execute(text("UPDATE jobs SET status = 'running' WHERE id = :j"), {"j": job_id})
    assert _delivery(job_id) is None  # only an end writes one
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', result = '{\"predictions\": []}', "
                "finished_at = now() WHERE id = :j"
            ),
            {"j": job_id},
        )
    row = _delivery(job_id)
    assert row is not None and row["attempts"] == 0 and row["url"] == receiver.url
    time.sleep(1.0)
    assert receiver.received == []  # no message was sent
    with session_scope() as session:  # past the grace a new delivery gets
        session.execute(
            text("UPDATE callback_deliveries SET next_at = now() WHERE job_id = :j"), {"j": job_id}
        )
    assert resend_callbacks() >= 1
    wait_for(lambda: receiver.received, 20, "the callback from the outbox")
    headers, body = receiver.received[0]
    assert body["id"] == job_id and body["status"] == "succeeded"
    assert headers["x-inferq-delivery"] == str(row["id"])
    assert wait_for(lambda: _delivery(job_id, delivered=True), 10, "the delivered row")
    from workers.tasks.callbacks import due_deliveries

    assert job_id not in due_deliveries()  # delivered: never sent again
    time.sleep(0.5)
    assert len(receiver.received) == 1
