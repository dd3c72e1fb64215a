"""Feature rows belong to a tenant: customers.tenant, and the demo schemas declare it

A tenant's ``entity_ids`` and score jobs read only its own rows of a feature table that
names a tenant column. Existing customers belong to tenant ``default``, the demo's.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "customers",
        sa.Column("tenant", sa.String(length=64), server_default="default", nullable=False),
    )
    op.execute(
        "UPDATE model_versions SET input_schema = input_schema "
        "|| jsonb_build_object('tenant_column', 'tenant') "
        "WHERE input_schema->>'feature_table' = 'customers'"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE model_versions SET input_schema = input_schema - 'tenant_column' "
        "WHERE input_schema->>'feature_table' = 'customers'"
    )
    op.drop_column("customers", "tenant")
