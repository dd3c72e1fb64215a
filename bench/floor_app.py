"""The floor of the online benchmark: a trivial ASGI app on the same uvicorn as ``inferq api``.

``POST /v1/jobs`` reads the body and answers 202 with a new id, keeping a stored job body
for it; ``GET /v1/jobs/{id}`` answers 200 with that body, as a succeeded inferq job reads.
No authentication, no database, no queue, no model: what is left is the HTTP server, the
event loop and the load generator, so inferq's pairs per second over this app's are the
share of the machine's HTTP ceiling that inferq reaches.

    python -m uvicorn bench.floor_app:app --port 8001 --log-level warning --no-access-log
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any

_KEEP = 100_000
_jobs: OrderedDict[str, bytes] = OrderedDict()
_HEADERS = [(b"content-type", b"application/json")]


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path, method = scope["path"], scope["method"]
    if method == "POST" and path == "/v1/jobs":
        request = json.loads(await _body(receive) or b"{}")
        job_id = str(uuid.uuid4())
        _jobs[job_id] = json.dumps(
            {
                "id": job_id,
                "status": "succeeded",
                "model": request.get("model"),
                "result": {"predictions": [{"score": 0.5, "label": False}]},
            }
        ).encode()
        while len(_jobs) > _KEEP:
            _jobs.popitem(last=False)
        await _send(send, 202, json.dumps({"id": job_id, "status": "queued"}).encode())
    elif method == "GET" and path.startswith("/v1/jobs/"):
        body = _jobs.get(path.rsplit("/", 1)[1])
        await _send(send, 200 if body else 404, body or b'{"detail": "no such job"}')
    elif path in ("/healthz", "/readyz"):
        await _send(send, 200, b'{"status": "ok"}')
    else:
        await _send(send, 404, b'{"detail": "not found"}')
