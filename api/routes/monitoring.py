"""/v1/models/{name}/drift and /shadow: drift reports and shadow versions."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select

from api.deps import Principal, SessionDep, require
from shared.config import get_settings
from shared.models import registry
from shared.monitoring import shadow
from shared.monitoring.reports import as_dict, latest
from shared.orm import Job, ModelShadow, ModelVersion

router = APIRouter(prefix="/v1/models", tags=["monitoring"])


def _version(session: SessionDep, name: str, version: int | None) -> ModelVersion:
    versions = registry.list_versions(session, name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {name!r}")
    if version is None:
        prod = next((v for v in versions if v.stage == "production"), None)
        if prod is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"model {name!r} has no production version: pass ?version=",
            )
        return prod
    found = next((v for v in versions if v.version == version), None)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} has no version {version}")
    return found


@router.get("/{name}/drift", summary="The latest drift report of a model version")
def drift(
    name: str,
    session: SessionDep,
    principal: Annotated[Principal, require("jobs:read")],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    window: Annotated[
        str,
        Query(
            max_length=64,
            description="`online` (the newest report over recent predict jobs) or a score "
            "job's id (the report of that run).",
        ),
    ] = "online",
) -> dict[str, Any]:
    """Per feature: the statistic (ks or chi2), its value and p-value, the PSI and whether
    it drifted; the same for the score distribution; rows in the reference and the
    window. See the README's Monitoring section for what each means."""
    mv = _version(session, name, version)
    run_id = None
    if window != "online":
        try:
            run_id = uuid.UUID(window)
        except ValueError:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ["query", "window"],
                        "msg": "window is 'online' or a score job's id",
                        "input": window,
                    }
                ]
            ) from None
        owner = session.scalar(select(Job.tenant).where(Job.id == run_id))
        if owner != principal.tenant:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no score job {window}")
    if not mv.reference_profile:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"{name} v{mv.version} has no reference profile (registered without a sample or "
            "a feature table), so no drift is computed for it",
        )
    report = latest(session, name, mv.version, run_id=run_id)
    if report is None:
        where = (
            f"score job {window}"
            if run_id
            else f"the online window (ops.drift reports every {get_settings().drift_every_s:g} s; "
            f"`inferq drift {name}` reports now)"
        )
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no drift report yet for {name} v{mv.version} over {where}"
        )
    return as_dict(report)


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt = Field(ge=1, le=2**31 - 1, description="A staging version.")
    sample_rate: float = Field(
        gt=0, le=1, description="Share of production predict jobs it also scores, (0, 1]."
    )


def _shadow_report(session: SessionDep, name: str) -> dict[str, Any]:
    found = session.get(ModelShadow, name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} has no shadow version")
    return shadow.report(session, found)


@router.put("/{name}/shadow", summary="Score a sample of production traffic with a version")
def put_shadow(
    name: str,
    body: ShadowRequest,
    session: SessionDep,
    _: Annotated[Principal, require("models:admin")],
) -> dict[str, Any]:
    """The version scores ``sample_rate`` of the production predict jobs after each has
    been settled, never delaying it; its answers are logged beside production's and never
    returned to clients. Replaces any earlier shadow of the model."""
    mv = _version(session, name, body.version)
    prod = registry.production_versions(session).get(name)
    if prod is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"model {name!r} has no production version to shadow"
        )
    if mv.version == prod:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ["body", "version"],
                    "msg": f"version {prod} is the production version: a shadow is another one",
                    "input": body.version,
                }
            ]
        )
    shadow.start(session, name, mv.version, body.sample_rate)
    session.commit()
    return _shadow_report(session, name)


@router.get("/{name}/shadow", summary="A shadow version compared with production")
def get_shadow(
    name: str, session: SessionDep, _: Annotated[Principal, require("jobs:read")]
) -> dict[str, Any]:
    """Rows compared, label agreement, mean and p99 absolute score difference, and the
    score drift of both versions against their own references."""
    _version(session, name, None)
    return _shadow_report(session, name)


@router.delete("/{name}/shadow", status_code=204, summary="Stop the shadow version")
def delete_shadow(
    name: str, session: SessionDep, _: Annotated[Principal, require("models:admin")]
) -> None:
    if not shadow.stop(session, name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name!r} has no shadow version")
    session.commit()
