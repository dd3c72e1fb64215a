"""/v1/models: the registry as clients see it, and promotion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, status

from api.deps import Principal, SessionDep, require
from api.registry_view import registry_view
from api.schemas import ModelPublic, ModelVersionPublic
from shared import registry
from shared.orm import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model(name: str, versions: list[ModelVersion]) -> ModelPublic:
    prod = next((v for v in versions if v.stage == "production"), None)
    shown = prod or versions[-1]
    return ModelPublic(
        name=name,
        kind=shown.kind,
        production_version=prod.version if prod else None,
        input_schema=shown.input_schema,
        versions=[
            ModelVersionPublic(
                version=v.version,
                stage=v.stage,
                metrics=v.metrics,
                sha256=v.sha256,
                training_window=v.training_window,
                created_at=v.created_at.isoformat() if v.created_at else None,
                promoted_at=v.promoted_at.isoformat() if v.promoted_at else None,
            )
            for v in versions
        ],
    )


@router.get("", response_model=list[ModelPublic])
def list_models(
    session: SessionDep, _: Annotated[Principal, require("jobs:read")]
) -> list[ModelPublic]:
    by_name: dict[str, list[ModelVersion]] = {}
    for v in registry.list_versions(session):
        by_name.setdefault(v.name, []).append(v)
    return [_model(name, versions) for name, versions in by_name.items()]


@router.get("/{name}", response_model=ModelPublic)
def get_model(
    name: str, session: SessionDep, _: Annotated[Principal, require("jobs:read")]
) -> ModelPublic:
    versions = registry.list_versions(session, name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {name!r}")
    return _model(name, versions)


@router.post("/{name}/versions/{version}/promote", response_model=ModelPublic)
def promote_version(
    name: str,
    version: int,
    session: SessionDep,
    _: Annotated[Principal, require("models:admin")],
) -> ModelPublic:
    """Make a version production. New jobs use it at once; workers preload it within seconds."""
    try:
        registry.promote(session, name=name, version=version)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    session.commit()
    registry_view.invalidate()
    return _model(name, registry.list_versions(session, name))
