"""Callbacks in an outbox: callback_deliveries, written by a trigger when a job ends

Every transaction that moves a job with a ``callback_url`` to a terminal state also
inserts its delivery (the trigger ``jobs_callback_outbox``), whichever code path ended
it: predict batches, score and train jobs, failures, cancels. A delivery is owed until a
worker records it delivered or given up; the sweeper sends those whose message was lost.
A new delivery is due 15 s after the end, so the message sent at once normally takes it
and the sweeper only covers a lost one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: Seconds a new delivery waits before the sweeper may send it.
GRACE_S = 15


def upgrade() -> None:
    op.create_table(
        "callback_deliveries",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name="fk_callback_deliveries_job_id_jobs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_callback_deliveries"),
        sa.UniqueConstraint("job_id", name="uq_callback_deliveries_job_id"),
    )
    op.create_index(
        "ix_callback_deliveries_due",
        "callback_deliveries",
        ["next_at"],
        postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
    )
    op.execute(
        f"""
        CREATE FUNCTION inferq_callback_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO callback_deliveries (job_id, url, next_at)
            VALUES (NEW.id, NEW.request->>'callback_url', now() + interval '{GRACE_S} seconds')
            ON CONFLICT (job_id) DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER jobs_callback_outbox AFTER UPDATE OF status ON jobs
        FOR EACH ROW
        WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled')
              AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
              AND NEW.request ? 'callback_url')
        EXECUTE FUNCTION inferq_callback_outbox()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_callback_outbox ON jobs")
    op.execute("DROP FUNCTION inferq_callback_outbox()")
    op.drop_index("ix_callback_deliveries_due", table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
