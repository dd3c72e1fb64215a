"""predictions: one index, the primary key (entity_id, scored_at, run_id), where there were two

A score run builds its partition's indexes at its close, after the rows are in: the one
cost of a run that a bare COPY does not pay (about half a second per million rows and
index). One key now does what the two indexes did. A run's rows carry the run's start
as their ``scored_at`` (its partition's CHECK constraint holds it to that), so within a
partition the key is unique exactly when ``entity_id`` is: one row per entity and run,
as ``(run_id, entity_id)`` said. And an entity's latest score is one backward probe per
run's partition, in ``scored_at`` order, as ``(entity_id, scored_at DESC)`` gave.

The upgrade rebuilds the key of every partition kept (a one-off cost in proportion to the
rows retained, under a lock on ``predictions``). Runs closed before it carry each chunk's
own time as ``scored_at``; their rows were held to one per entity by the old key when
they were written, and a closed run is never written again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 18:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_predictions_entity_latest")
    op.execute("ALTER TABLE predictions DROP CONSTRAINT pk_predictions")
    op.execute(
        "ALTER TABLE predictions ADD CONSTRAINT pk_predictions "
        "PRIMARY KEY (entity_id, scored_at, run_id)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE predictions DROP CONSTRAINT pk_predictions")
    op.execute(
        "ALTER TABLE predictions ADD CONSTRAINT pk_predictions PRIMARY KEY (run_id, entity_id)"
    )
    op.execute(
        "CREATE INDEX ix_predictions_entity_latest ON predictions (entity_id, scored_at DESC)"
    )
