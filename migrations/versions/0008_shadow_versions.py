"""Shadow versions: model_shadows and the predictions they make beside production

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 07:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_shadows",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sample_rate", sa.Double(), nullable=False),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name="pk_model_shadows"),
    )
    op.create_table(
        "shadow_predictions",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("production_version", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("production_score", sa.Double(), nullable=False),
        sa.Column("production_label", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("job_id", "row", "version", name="pk_shadow_predictions"),
    )
    op.create_index(
        "ix_shadow_predictions_model", "shadow_predictions", ["model", "version", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_shadow_predictions_model", table_name="shadow_predictions")
    op.drop_table("shadow_predictions")
    op.drop_table("model_shadows")
