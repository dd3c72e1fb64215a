"""Drift: a reference profile per model version, and drift_reports

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "model_versions",
        sa.Column("reference_profile", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("run_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows_reference", sa.Integer(), nullable=False),
        sa.Column("rows_window", sa.Integer(), nullable=False),
        sa.Column("enough_rows", sa.Boolean(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("features", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_drift_reports"),
    )
    op.create_index(
        "ix_drift_reports_latest",
        "drift_reports",
        ["model", "version", "source", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_drift_reports_latest", table_name="drift_reports")
    op.drop_table("drift_reports")
    op.drop_column("model_versions", "reference_profile")
