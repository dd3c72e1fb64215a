"""Calls to an MLflow tracking server: client settings pinned for the call (no retries
for minutes on an unreachable server), and every failure turned into one
:class:`MlflowSourceError` line naming the URI and the problem."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

__all__ = [
    "MlflowSourceError",
    "call_server",
    "tracking_client",
    "error_code",
    "one_line",
    "shorten",
    "missing_extra",
]

#: Client settings for the duration of a server call, unless the operator has set them:
#: MLflow's defaults (7 retries with backoff, 120 s timeout) turn an unreachable server
#: into minutes of waiting.
_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
#: Pinned to the call's tracking URI, a safety net only: a few MLflow code paths (models:/
#: URI resolution) ignore the URIs passed in and fall back to these, and unset, to a
#: ./mlflow.db that they create. (An ``mlflow.set_tracking_uri`` of the process wins over them.)
_PINNED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_env_lock = threading.RLock()


class MlflowSourceError(ValueError):
    """A model could not be read from MLflow; the message names the URI and the problem."""


@contextmanager
def tracking_client(uri: str, tracking_uri: str) -> Iterator[Any]:
    """An ``MlflowClient`` for ``tracking_uri`` with bounded HTTP retries and timeouts."""
    if not isinstance(tracking_uri, str) or not tracking_uri.startswith(("http://", "https://")):
        # An empty URI would make MLflow fall back to ./mlflow.db (and create it).
        raise MlflowSourceError(
            f"{uri}: the MLflow tracking URI must be http(s)://..., got {tracking_uri!r}"
        )
    try:
        from mlflow import MlflowClient
    except ImportError:
        missing_extra()
    # os.environ is process-wide: one call at a time sets and restores it.
    with _env_lock:
        saved = {k: os.environ.get(k) for k in (*_CLIENT_ENV, *_PINNED_ENV)}
        for k, default in _CLIENT_ENV.items():
            os.environ.setdefault(k, default)
        for k in _PINNED_ENV:
            os.environ[k] = tracking_uri
        try:
            yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old


def call_server(uri: str, tracking_uri: str, fn: Any, *, not_found: str | None = None) -> Any:
    """``fn()``, with any failure turned into a one-line :class:`MlflowSourceError`."""
    try:
        return fn()
    except MlflowSourceError:
        raise
    except Exception as e:
        code = error_code(e)
        text = one_line(e)
        # A missing alias on an existing model comes back as INVALID_PARAMETER_VALUE.
        missing = code == "RESOURCE_DOES_NOT_EXIST" or (
            code == "INVALID_PARAMETER_VALUE" and "not found" in text.lower()
        )
        if not_found and missing:
            msg = f"{not_found} at {tracking_uri}"
        elif _is_connection_error(e, text):
            msg = f"cannot reach the MLflow tracking server {tracking_uri} ({_reason(text)})"
        elif "failed with error code 404 != 200" in text:
            # An HTTP server answered, but without MLflow's API under that URL.
            msg = f"no MLflow tracking server at {tracking_uri} (HTTP 404)"
        else:
            msg = f"MLflow error from {tracking_uri}: {shorten(text)}"
        raise MlflowSourceError(f"{uri}: {msg}") from None


def error_code(e: BaseException) -> str | None:
    code = getattr(e, "error_code", None)
    return code if isinstance(code, str) else None


def _is_connection_error(e: BaseException, text: str) -> bool:
    import requests

    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    # MLflow wraps requests' errors: "API request to ... failed with exception ...".
    return "failed with exception" in text and (
        "Max retries exceeded" in text or "timed out" in text or "Connection" in text
    )


def _reason(text: str) -> str:
    for pattern in (r"\[Errno -?\d+\] [^'\")\]]+", r"Read timed out", r"timed out"):
        if m := re.search(pattern, text):
            return m.group(0).strip()
    return "no response"


def one_line(e: BaseException) -> str:
    # MLflow's messages run over several lines (a header, then the failures).
    return " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__


def shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_extra() -> NoReturn:
    raise MlflowSourceError(
        "MLflow support needs the [mlflow] extra: pip install 'inferq[mlflow]'"
    ) from None
