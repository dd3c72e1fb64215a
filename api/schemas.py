"""Request and response bodies of the v1 API, for validation and the OpenAPI document.

The job schemas show the fields of ``shared.jobs.fields`` (``VIEW_FIELDS``,
``ACCEPTED_FIELDS``, ``SUMMARY_FIELDS``), each with ``links``; tests/test_layout.py holds
them to it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from shared.jobs.fields import JobType, Priority
from shared.models.catalog import CHURN_EXAMPLE_ROW

__all__ = [
    "JobCreate",
    "JobAccepted",
    "JobPublic",
    "JobSummary",
    "JobList",
    "ModelVersionPublic",
    "VersionMetadata",
    "ModelPublic",
    "Problem",
]


#: One input row in the OpenAPI document (checked against the model's own schema, by
#: ``api.validation``, with errors naming the row and the field).
Row = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": True,
            "description": "One feature row: see GET /v1/models/{name}/row-schema.",
        }
    ),
]
#: The demo churn model's row, the example in /docs.
EXAMPLE_ROW = CHURN_EXAMPLE_ROW


# What a client sends to POST /v1/jobs.
class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: JobType = JobType.PREDICT
    model: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: StrictInt | None = Field(
        None, ge=1, le=2**31 - 1, description="Pin a version; default production."
    )
    inputs: list[Row] | None = Field(
        None,
        description="predict: feature rows, one object each, feature name to value. A "
        "model's row: `GET /v1/models/{name}/row-schema` (a JSON Schema), or its "
        "`input_schema` in `GET /v1/models/{name}`.",
        examples=[[EXAMPLE_ROW]],
    )
    entity_ids: list[Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]] | None = Field(
        None, description="predict: ids in the model's feature table, instead of inputs."
    )
    segment: dict[str, Any] | None = Field(None, description="score: equality / IN filters.")
    promote: Literal["never", "if_better", "always"] | None = Field(
        None, description="train: promotion policy (default if_better)."
    )
    priority: Priority = Priority.NORMAL
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None


# The 202 (or the 200 of an idempotent replay).
class JobAccepted(BaseModel):
    id: str
    type: str
    status: str
    model: str
    model_version: int | None
    created_at: str | None
    links: dict[str, str]


# A job as GET /v1/jobs/{id} shows it.
class JobPublic(BaseModel):
    id: str
    type: str
    status: str
    model: str
    model_version: int | None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    attempts: int = 0
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    links: dict[str, str] = {}


# A row of the jobs list (no result: fetch the job for that).
class JobSummary(BaseModel):
    id: str
    type: str
    status: str
    model: str
    model_version: int | None
    created_at: str | None
    finished_at: str | None
    links: dict[str, str]


# GET /v1/jobs: newest first; pass next_cursor back as ?cursor= for the next page.
class JobList(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


# One registered version.
class ModelVersionPublic(BaseModel):
    version: int
    stage: str
    kind: str
    format: str = Field(description="Artifact format: skops, joblib or pickle.")
    metrics: dict[str, Any]
    sha256: str
    threshold: float | None = None
    classes: list[Any] | None = Field(None, description="A classifier's classes, in order.")
    input_schema: dict[str, Any]
    source: dict[str, Any] | None = None
    training_window: dict[str, Any] | None
    created_at: str | None
    promoted_at: str | None


# The optional JSON part `metadata` of POST /v1/models/{name}/versions.
class VersionMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "classifier", "regressor", "anomaly"] = "auto"
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="Declared input schema; overrides inference."
    )
    sample: list[dict[str, Any]] | str | None = Field(
        None, description="Rows like the training data: JSON objects, or CSV text."
    )
    threshold: float | None = Field(None, ge=0, le=1, description="Binary decision threshold.")
    feature_table: str | None = Field(None, max_length=128)
    key: str | None = Field(None, max_length=63)
    tenant_column: str | None = Field(
        None, max_length=63, description="The feature table's column naming each row's tenant."
    )
    trusted: list[str] = Field(
        default_factory=list, description="skops types to trust beyond skops' defaults."
    )
    uri: str | None = Field(
        None, description="Instead of a file: an MLflow URI (models:/NAME@ALIAS, runs:/...)."
    )
    promote: bool = Field(False, description="Make the new version production at once.")


# A model: its kind, the production version's input schema, and every version.
class ModelPublic(BaseModel):
    name: str
    kind: str
    production_version: int | None
    input_schema: dict[str, Any]
    versions: list[ModelVersionPublic]


# Error body for everything but validation (which uses FastAPI's detail list).
class Problem(BaseModel):
    detail: str
