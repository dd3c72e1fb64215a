"""Artifact bytes in Postgres, users' own models, MLflow follows, multi-class predictions

- ``model_artifacts`` holds each artifact's bytes once, keyed by sha256, so a worker on
  any machine needs only the database; ``model_versions.artifact_path`` goes. Artifacts of
  existing versions are read from their files into the table (a version whose file this
  machine cannot read keeps its row and fails to load with ``model_unavailable``).
- ``model_versions`` gains ``artifact_format``, ``classes``, ``trusted_types``, ``source``;
  input schemas name their feature table as ``feature_table`` / ``key`` and their input
  mode (the built-ins take category codes: ``codes``).
- ``model_follows``: models whose production version follows an MLflow alias.
- ``predictions`` and ``prediction_logs`` gain ``predicted_class`` for multi-class models.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:30:00
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_artifacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_model_artifacts")),
    )
    op.create_table(
        "model_follows",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("mlflow_version", sa.String(length=32), nullable=True),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_follows")),
    )
    op.add_column(
        "model_versions",
        sa.Column("artifact_format", sa.String(length=16), server_default="joblib", nullable=False),
    )
    op.alter_column("model_versions", "artifact_format", server_default=None)
    op.add_column(
        "model_versions",
        sa.Column("classes", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "model_versions",
        sa.Column(
            "trusted_types",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )
    op.alter_column("model_versions", "trusted_types", server_default=None)
    op.add_column(
        "model_versions",
        sa.Column("source", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    conn = op.get_bind()
    for vid, path, digest in conn.execute(
        sa.text("SELECT id, artifact_path, sha256 FROM model_versions")
    ).all():
        try:
            data = Path(path).read_bytes()
        except OSError:
            data = b""
        if hashlib.sha256(data).hexdigest() != digest:
            # Keep the row loadable by nothing: its bytes are not here.
            data = b""
        conn.execute(
            sa.text(
                "INSERT INTO model_artifacts (sha256, format, size, data) "
                "VALUES (:s, 'joblib', :n, :d) ON CONFLICT DO NOTHING"
            ),
            {"s": digest, "n": len(data), "d": data},
        )
        conn.execute(
            sa.text(
                "UPDATE model_versions SET source = jsonb_build_object('file', :p) WHERE id = :i"
            ),
            {"p": path, "i": vid},
        )
    # The built-ins' classes, and their schemas in the new vocabulary.
    conn.execute(
        sa.text("UPDATE model_versions SET classes = '[0, 1]'::jsonb WHERE kind = 'classifier'")
    )
    conn.execute(
        sa.text(
            "UPDATE model_versions SET input_schema = (input_schema - 'entity_table') "
            "|| jsonb_build_object('input', 'codes') "
            "|| CASE WHEN input_schema->>'entity_table' IS NULL THEN '{}'::jsonb "
            "ELSE jsonb_build_object('feature_table', input_schema->>'entity_table', 'key', 'id') "
            "END"
        )
    )
    op.drop_column("model_versions", "artifact_path")
    op.create_foreign_key(
        op.f("fk_model_versions_sha256_model_artifacts"),
        "model_versions",
        "model_artifacts",
        ["sha256"],
        ["sha256"],
    )
    op.add_column("predictions", sa.Column("predicted_class", sa.Text(), nullable=True))
    op.add_column("prediction_logs", sa.Column("predicted_class", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("prediction_logs", "predicted_class")
    op.drop_column("predictions", "predicted_class")
    op.drop_constraint(
        op.f("fk_model_versions_sha256_model_artifacts"), "model_versions", type_="foreignkey"
    )
    op.add_column(
        "model_versions",
        sa.Column("artifact_path", sa.Text(), server_default="", nullable=False),
    )
    op.drop_column("model_versions", "source")
    op.drop_column("model_versions", "trusted_types")
    op.drop_column("model_versions", "classes")
    op.drop_column("model_versions", "artifact_format")
    op.drop_table("model_follows")
    op.drop_table("model_artifacts")
