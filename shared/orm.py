"""SQLAlchemy 2 models: the durable record. Alembic migrations create exactly these tables."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "ApiKey",
    "Job",
    "CallbackDelivery",
    "ModelArtifact",
    "ModelVersion",
    "ModelFollow",
    "Customer",
    "Prediction",
    "PredictionLog",
    "ScoringRun",
    "ScoringChunk",
    "DriftReport",
    "ModelShadow",
    "ShadowPrediction",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: A run's partition of ``predictions`` and its chunks' tables: not in the models, created
#: per run.
RUN_PARTITION = re.compile(r"^predictions_[0-9a-f]{32}(_[0-9]+)?$")


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare: Any) -> bool:
    """For comparing the models with the database: the per-run partitions (and their
    indexes) are not part of the declared schema."""
    table = getattr(obj, "table", obj) if type_ != "table" else obj
    return not RUN_PARTITION.match(str(getattr(table, "name", name) or ""))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class ApiKey(Base):
    """A client credential: only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    rate_limit_per_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """One unit of client work. Its status changes only through the compare-and-sets of
    ``shared.jobs.store``."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", text("created_at DESC"), text("id DESC")),
        Index(
            "uq_jobs_tenant_idempotency_key",
            "tenant",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # The sweeper's scan: only unfinished jobs, which are few. Keyed on finished_at, not
        # status, so compare-and-sets by id are never planned through it (it is full of
        # dead entries between vacuums; see migration 0002).
        Index("ix_jobs_unfinished", "created_at", postgresql_where=text("finished_at IS NULL")),
        # Retention's range scan; BRIN, as jobs arrive in time order (migration 0006).
        Index("ix_jobs_created_at_brin", "created_at", postgresql_using="brin"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = _now()
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CallbackDelivery(Base):
    """The outbox of callbacks: one row per ended job that asked for one, written by a
    trigger on ``jobs`` in the very transaction that ends the job (see migration 0005),
    so a callback is never lost between the commit and its send. ``id`` is the delivery
    id the receiver sees on every attempt (``X-Inferq-Delivery``) and can de-duplicate on.
    """

    __tablename__ = "callback_deliveries"
    __table_args__ = (
        # The sweeper's scan: deliveries still owed, by when they are due.
        Index(
            "ix_callback_deliveries_due",
            "next_at",
            postgresql_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    #: When the next attempt is due (or, while one runs, when its lease ends).
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    gave_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ModelArtifact(Base):
    """An artifact's bytes, once per content: every process on every machine reads them
    here (and caches them on local disk), verified against the sha256 before each load."""

    __tablename__ = "model_artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = _now()


class ModelVersion(Base):
    """A registered model version: its artifact (by sha256), kind, input schema and stage."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # At most one production version per model name.
        Index(
            "uq_model_versions_production",
            "name",
            unique=True,
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    artifact_format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(ForeignKey("model_artifacts.sha256"))
    input_schema: Mapped[dict[str, Any]] = mapped_column(JSONB)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    threshold: Mapped[float | None] = mapped_column(Double, nullable=True)
    #: A classifier's classes_, in order (the binary positive class is the second).
    classes: Mapped[list[Any] | None] = mapped_column(JSONB, nullable=True)
    #: Types outside skops' default trusted set that an admin approved at registration.
    trusted_types: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    #: Where the artifact came from: a file name, an MLflow URI and version, a training run.
    source: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    training_window: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    #: What the version saw in training or at registration: per feature quantile bins or
    #: category frequencies, and its scores (``shared.monitoring.profile``).
    reference_profile: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    stage: Mapped[str] = mapped_column(String(16), default="staging")
    created_at: Mapped[datetime] = _now()
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelFollow(Base):
    """A model whose production version follows an MLflow registry alias."""

    __tablename__ = "model_follows"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    #: The MLflow model version last imported, so a sync imports each version once.
    mlflow_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _now()


class Customer(Base):
    """The demo churn model's feature table: one row per customer, its nine features."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: Whose customer this is: only that tenant's entity_ids and score jobs see the row.
    tenant: Mapped[str] = mapped_column(String(64), server_default="default")
    tenure_months: Mapped[int] = mapped_column(SmallInteger)
    monthly_spend: Mapped[float] = mapped_column(Double)
    support_tickets: Mapped[int] = mapped_column(SmallInteger)
    feature_usage_pct: Mapped[float] = mapped_column(Double)
    last_login_days_ago: Mapped[int] = mapped_column(SmallInteger)
    num_integrations: Mapped[int] = mapped_column(SmallInteger)
    contract_type: Mapped[str] = mapped_column(String(16))
    plan_tier: Mapped[str] = mapped_column(String(16))
    is_enterprise: Mapped[int] = mapped_column(SmallInteger)
    churned: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    updated_at: Mapped[datetime] = _now()


class ScoringRun(Base):
    """One population scoring run; ``schedule_key`` makes a scheduled run unique per night."""

    __tablename__ = "scoring_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    segment: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    schedule_key: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    rows_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Double, nullable=True)


class ScoringChunk(Base):
    """The durable plan of a run: one row per id range, marked done in the transaction
    that writes its predictions, so a chunk delivered twice writes once."""

    __tablename__ = "scoring_chunks"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("scoring_runs.id", ondelete="CASCADE"), primary_key=True
    )
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    lo: Mapped[int] = mapped_column(BigInteger)
    hi: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    histogram: Mapped[list[Any] | None] = mapped_column(JSONB, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Prediction(Base):
    """A score job's row. Its rows carry the run's start as ``scored_at`` (the partition's
    CHECK holds them to it), so the key (entity_id, scored_at, run_id) is unique per entity
    and run, a chunk run twice cannot write twice, and an entity's latest score is one
    backward probe per run's partition.

    Partitioned by run: each run has a partition of its own (``shared.scoring.partitions``), dropped
    whole when retention ends the run."""

    __tablename__ = "predictions"
    __table_args__ = (
        PrimaryKeyConstraint("entity_id", "scored_at", "run_id"),
        {"postgresql_partition_by": "LIST (run_id)"},
    )

    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    entity_id: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Double)
    label: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    #: A multi-class model's predicted class (``score`` is its probability).
    predicted_class: Mapped[str | None] = mapped_column(Text, nullable=True)
    scored_at: Mapped[datetime] = _now()


class PredictionLog(Base):
    """Every online prediction, bulk-written; (job_id, row) makes redelivery harmless."""

    __tablename__ = "prediction_logs"
    __table_args__ = (
        UniqueConstraint("job_id", "row"),
        Index("ix_prediction_logs_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    row: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSONB)
    score: Mapped[float] = mapped_column(Double)
    label: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    predicted_class: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _now()


class DriftReport(Base):
    """One comparison of a version's live inputs and scores with its reference profile:
    an online window of prediction logs, or a score run (``run_id``)."""

    __tablename__ = "drift_reports"
    __table_args__ = (Index("ix_drift_reports_latest", "model", "version", "source", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    #: ``online`` (prediction logs of a time window) or ``score`` (one score run).
    source: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rows_reference: Mapped[int] = mapped_column(Integer)
    rows_window: Mapped[int] = mapped_column(Integer)
    #: False when the window had too few rows to judge: nothing is flagged then.
    enough_rows: Mapped[bool] = mapped_column(Boolean)
    drifted: Mapped[bool] = mapped_column(Boolean)
    #: Per feature: statistic, value, p-value, drifted.
    features: Mapped[list[Any]] = mapped_column(JSONB)
    #: The score distribution's statistics, the thresholds and the corrected p-value.
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class ModelShadow(Base):
    """A staging version scoring a sample of its model's production predict traffic."""

    __tablename__ = "model_shadows"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    sample_rate: Mapped[float] = mapped_column(Double)
    started_at: Mapped[datetime] = _now()


class ShadowPrediction(Base):
    """One row a shadow version predicted beside production; never shown to clients."""

    __tablename__ = "shadow_predictions"
    __table_args__ = (Index("ix_shadow_predictions_model", "model", "version", "created_at"),)

    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    production_version: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Double)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    production_score: Mapped[float] = mapped_column(Double)
    production_label: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _now()
