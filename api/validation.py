"""Validating a job request against the model registry and the model's input schema.

The common case touches no database: the production map and each version's schema are
cached (``api.registry_view``). Only a cold cache and ``entity_ids`` (which must exist in
the feature table) need a query, run off the event loop.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from api.registry_view import VersionInfo, registry_view
from api.schemas import JobCreate
from shared import jsonsafe
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs.callbacks import CallbackRefusedError, check_url
from shared.jobs.fields import JobType
from shared.models.catalog import SPECS
from shared.models.features import FeatureTable, unknown_entities
from shared.models.schema import validate_rows
from shared.scoring.plan import validate_segment

__all__ = ["validate_job", "request_hash"]

#: Bodies with more rows than this are validated off the event loop.
_INLINE_ROWS = 200


def invalid(
    field: str | tuple[Any, ...], msg: str, kind: str = "value_error", value: Any = None
) -> None:
    """A 422 naming ``field``, with the ``value`` the client sent there."""
    loc = ["body", *(field if isinstance(field, tuple) else (field,))]
    raise RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _not_for(body: JobCreate, job_type: str, *fields: str) -> None:
    for f in fields:
        if getattr(body, f) is not None:
            invalid(f, f"'{f}' is not accepted for {job_type} jobs")


def _resolve_with_session(name: str, version: int | None) -> VersionInfo | tuple[str, str]:
    with session_scope() as session:
        return registry_view.resolve(session, name, version)


async def _resolve(body: JobCreate) -> VersionInfo:
    resolved: VersionInfo | tuple[str, str] | None = registry_view.resolve_cached(
        body.model, body.version
    )
    if resolved is None:
        resolved = await run_in_threadpool(_resolve_with_session, body.model, body.version)
    if isinstance(resolved, tuple):
        field, msg = resolved
        invalid(field, msg, value=getattr(body, field, None))
    assert isinstance(resolved, VersionInfo)
    return resolved


def _unknown_entities(ft: FeatureTable, ids: list[int], tenant: str) -> list[tuple[int, int]]:
    with session_scope() as session:
        return unknown_entities(session, ft, ids, tenant)


async def _validate_predict(body: JobCreate, info: VersionInfo, max_rows: int, tenant: str) -> dict:
    _not_for(body, "predict", "segment", "promote")
    if (body.inputs is None) == (body.entity_ids is None):
        invalid("inputs", "give exactly one of 'inputs' or 'entity_ids'", "missing")
    field = "inputs" if body.inputs is not None else "entity_ids"
    rows: list[Any] = body.inputs if body.inputs is not None else body.entity_ids  # type: ignore
    if not rows:
        invalid(field, f"'{field}' must hold at least one row", "too_short")
    if len(rows) > max_rows:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            [
                {
                    "type": "too_long",
                    "loc": ["body", field],
                    "msg": f"{len(rows)} rows; at most {max_rows} per job (INFERQ_MAX_ROWS)",
                }
            ],
        )
    if body.inputs is not None:
        if len(rows) <= _INLINE_ROWS:
            errors = validate_rows(rows, info.schema)
        else:
            errors = await run_in_threadpool(validate_rows, rows, info.schema)
        if errors:
            raise RequestValidationError(errors)
        return {"inputs": rows}
    ft = FeatureTable.of(info.schema)
    if ft is None:
        invalid("entity_ids", f"model {info.name!r} has no feature table; send 'inputs'")
    assert ft is not None
    unknown = await run_in_threadpool(_unknown_entities, ft, rows, tenant)
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
    return {"entity_ids": rows}


def _validate_score(body: JobCreate, info: VersionInfo) -> dict:
    _not_for(body, "score", "inputs", "entity_ids", "promote")
    if FeatureTable.of(info.schema) is None:
        invalid("model", f"model {info.name!r} has no feature table to score")
    segment = body.segment or {}
    errors = validate_segment(segment, info.schema)
    if errors:
        raise RequestValidationError(errors)
    return {"segment": segment}


def _storable(body: JobCreate) -> None:
    """Free-form values jsonb would refuse (NUL, lone surrogates, NaN, deep nesting): a
    422 here, never a failed group commit (rows are checked per field by their schema)."""
    for name in ("metadata", "callback_url"):
        found = jsonsafe.problem(getattr(body, name))
        if found is not None:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ["body", name, *found[0]],
                        "msg": found[1],
                        "input": None,
                    }
                ]
            )


async def validate_job(body: JobCreate, max_rows: int, tenant: str) -> tuple[int | None, dict]:
    """(model version, request to store) for ``tenant``'s job, or a 413/422 naming the
    field."""
    _storable(body)
    if body.callback_url is not None:
        try:
            # No DNS lookup on the request path: names are resolved and checked at delivery.
            check_url(
                body.callback_url,
                allow_private=get_settings().callback_allow_private,
                resolve=False,
            )
        except CallbackRefusedError as exc:
            invalid("callback_url", str(exc))
    if body.type == JobType.TRAIN:
        _not_for(body, "train", "inputs", "entity_ids", "segment", "version")
        if body.model not in SPECS:
            invalid(
                "model",
                f"inferq trains only its built-in models ({', '.join(sorted(SPECS))}); "
                f"register new versions of {body.model!r} with POST /v1/models/"
                f"{body.model}/versions",
            )
        request: dict[str, Any] = {"promote": body.promote or "if_better"}
        if body.callback_url is not None:
            request["callback_url"] = body.callback_url
        return None, request
    info = await _resolve(body)
    if body.type == JobType.SCORE:
        version, request = info.version, _validate_score(body, info)
    else:
        version, request = info.version, await _validate_predict(body, info, max_rows, tenant)
    if body.callback_url is not None:
        request["callback_url"] = body.callback_url
    return version, request
