"""ix_jobs_unfinished keyed on finished_at IS NULL

A job's status changes three times in a few milliseconds, so an index restricted to
``status IN ('queued', 'running')`` holds few live rows but every dead entry since the
last vacuum. The planner, seeing a small index, chose it for compare-and-sets by id
(``... WHERE id = ANY(...) AND status = 'running'``) and walked thousands of dead entries
per statement. Keyed on ``finished_at IS NULL``, only queries that ask for unfinished jobs
in so many words (the sweeper) can use it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_unfinished", table_name="jobs")
    op.create_index(
        "ix_jobs_unfinished",
        "jobs",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_unfinished", table_name="jobs")
    op.create_index(
        "ix_jobs_unfinished",
        "jobs",
        ["status", "created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
