"""predictions partitioned by run, so an old run is dropped whole; a BRIN index for job retention

``predictions`` becomes a table partitioned by ``LIST (run_id)``: each score run writes
into a partition of its own (``predictions_<run id hex>``, created and attached when the
run is planned), and retention drops a run's rows by detaching and dropping its
partition, not by deleting row by row. Existing rows move into one partition per run.

``jobs`` gains a BRIN index on ``created_at`` for retention's range scan: jobs arrive in
time order, so it is a few pages, and costs the submit path next to nothing (a B-tree
would add an index insertion to every job).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = """
    run_id uuid NOT NULL,
    entity_id bigint NOT NULL,
    model varchar(64) NOT NULL,
    version integer NOT NULL,
    score double precision NOT NULL,
    label boolean,
    scored_at timestamptz NOT NULL DEFAULT now(),
    predicted_class text
"""


def upgrade() -> None:
    op.execute("ALTER TABLE predictions RENAME TO predictions_before_0006")
    op.execute("ALTER TABLE predictions_before_0006 RENAME CONSTRAINT pk_predictions TO pk_p0006")
    op.execute("ALTER INDEX ix_predictions_entity_latest RENAME TO ix_p0006_entity_latest")
    op.execute(
        f"CREATE TABLE predictions ({_COLUMNS}, CONSTRAINT pk_predictions "
        "PRIMARY KEY (run_id, entity_id)) PARTITION BY LIST (run_id)"
    )
    op.execute(
        "CREATE INDEX ix_predictions_entity_latest ON predictions (entity_id, scored_at DESC)"
    )
    op.execute(
        """
        DO $$
        DECLARE run uuid;
        BEGIN
            FOR run IN SELECT DISTINCT run_id FROM predictions_before_0006 LOOP
                EXECUTE format('CREATE TABLE %I PARTITION OF predictions FOR VALUES IN (%L)',
                               'predictions_' || replace(run::text, '-', ''), run);
            END LOOP;
        END $$
        """
    )
    op.execute(
        "INSERT INTO predictions (run_id, entity_id, model, version, score, label, scored_at, "
        "predicted_class) SELECT run_id, entity_id, model, version, score, label, scored_at, "
        "predicted_class FROM predictions_before_0006"
    )
    op.execute("DROP TABLE predictions_before_0006")
    op.execute("CREATE INDEX ix_jobs_created_at_brin ON jobs USING brin (created_at)")


def downgrade() -> None:
    op.execute("DROP INDEX ix_jobs_created_at_brin")
    op.execute("ALTER TABLE predictions RENAME TO predictions_partitioned")
    op.execute("ALTER TABLE predictions_partitioned RENAME CONSTRAINT pk_predictions TO pk_pp")
    op.execute("ALTER INDEX ix_predictions_entity_latest RENAME TO ix_pp_entity_latest")
    op.execute(
        f"CREATE TABLE predictions ({_COLUMNS}, CONSTRAINT pk_predictions "
        "PRIMARY KEY (run_id, entity_id))"
    )
    op.execute(
        "CREATE INDEX ix_predictions_entity_latest ON predictions (entity_id, scored_at DESC)"
    )
    op.execute("INSERT INTO predictions SELECT * FROM predictions_partitioned")
    op.execute("DROP TABLE predictions_partitioned")  # drops its partitions with it
