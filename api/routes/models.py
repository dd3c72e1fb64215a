"""/v1/models: the registry as clients see it, registration of users' models, promotion."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.deps import Principal, SessionDep, require
from api.registry_view import registry_view
from api.schemas import ModelPublic, ModelVersionPublic, VersionMetadata
from shared.config import get_settings
from shared.models import registry
from shared.models.intake import IntakeError, Submission, register_artifact, sample_frame
from shared.models.schema import row_json_schema
from shared.orm import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])


def version_view(v: ModelVersion) -> ModelVersionPublic:
    return ModelVersionPublic(
        version=v.version,
        stage=v.stage,
        kind=v.kind,
        format=v.artifact_format,
        metrics=v.metrics,
        sha256=v.sha256,
        threshold=v.threshold,
        classes=v.classes,
        input_schema=v.input_schema,
        source=v.source,
        training_window=v.training_window,
        created_at=v.created_at.isoformat() if v.created_at else None,
        promoted_at=v.promoted_at.isoformat() if v.promoted_at else None,
    )


def _model(name: str, versions: list[ModelVersion]) -> ModelPublic:
    prod = next((v for v in versions if v.stage == "production"), None)
    shown = prod or versions[-1]
    return ModelPublic(
        name=name,
        kind=shown.kind,
        production_version=prod.version if prod else None,
        input_schema=shown.input_schema,
        versions=[version_view(v) for v in versions],
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


@router.get(
    "/{name}/row-schema",
    summary="JSON Schema of one input row",
    response_description="A JSON Schema (2020-12) of one element of a predict job's `inputs`.",
)
def row_schema(
    name: str,
    session: SessionDep,
    _: Annotated[Principal, require("jobs:read")],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> dict[str, Any]:
    """What each row of `inputs` must be for this model: the production version's, or
    `version`'s. Every feature is required and nothing else is allowed."""
    versions = registry.list_versions(session, name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {name!r}")
    if version is None:
        chosen = next((v for v in versions if v.stage == "production"), versions[-1])
    else:
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"model {name!r} has no version {version}"
            )
        chosen = found
    return row_json_schema(chosen.input_schema, title=f"{name} v{chosen.version} input row")


def _invalid(loc: list[Any], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": None}])


def _metadata(raw: str | None) -> VersionMetadata:
    if raw is None:
        return VersionMetadata()
    try:
        return VersionMetadata.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise _invalid(["body", "metadata"], f"metadata is not JSON: {exc}") from None
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {
                    "type": e["type"],
                    "loc": ["body", "metadata", *e["loc"]],
                    "msg": e["msg"],
                    "input": None,
                }
                for e in exc.errors()
            ]
        ) from None


@router.post(
    "/{name}/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelVersionPublic,
    responses={413: {"description": "artifact over INFERQ_MAX_ARTIFACT_BYTES"}},
)
def register_version(
    name: str,
    session: SessionDep,
    _: Annotated[Principal, require("models:admin")],
    artifact: Annotated[
        UploadFile | None, File(description="A .skops, .joblib or .pkl file of a fitted model.")
    ] = None,
    metadata: Annotated[
        str | None, Form(description="JSON: kind, schema, sample, threshold, feature_table, ...")
    ] = None,
) -> ModelVersionPublic:
    """Register a version of ``name`` from a model file (or an MLflow URI in ``metadata``).

    Its kind and input schema are read from the estimator, the sample and the declared
    schema; it must predict the sample. The new version is ``staging`` unless ``promote``.
    """
    meta = _metadata(metadata)
    if (artifact is None) == (meta.uri is None):
        raise _invalid(["body", "artifact"], "give exactly one of a file 'artifact' or 'uri'")
    try:
        sub = Submission(
            name=name,
            data=b"",
            kind=meta.kind,
            schema=meta.schema_,
            sample=sample_frame(meta.sample) if meta.sample is not None else None,
            threshold=meta.threshold,
            feature_table=meta.feature_table,
            key=meta.key,
            tenant_column=meta.tenant_column,
            trusted=meta.trusted,
        )
        if artifact is not None:
            sub.data, sub.filename = artifact.file.read(), artifact.filename
        else:
            from shared.models.follow import from_mlflow

            assert meta.uri is not None
            from_mlflow(sub, meta.uri, get_settings().mlflow_tracking_uri)
        mv = register_artifact(session, sub)
        if meta.promote:
            registry.promote(session, name=name, version=mv.version)
    except IntakeError as exc:
        session.rollback()
        own = {"name": ["path", "name"], "artifact": ["body", "artifact"]}
        raise _invalid(own.get(exc.field, ["body", "metadata", exc.field]), str(exc)) from None
    session.commit()
    registry_view.invalidate()
    return version_view(mv)


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
