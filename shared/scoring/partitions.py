"""``predictions`` is partitioned by run: each score run writes into a partition of its
own, and an old run is dropped whole (retention) instead of deleted row by row."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection

from shared import sql
from shared.sql import Statement


def partition_name(run_id: uuid.UUID) -> str:
    """The run's own partition of ``predictions``."""
    return f"predictions_{run_id.hex}"


_ATTACHED = Statement(
    "inferq_partition_attached",
    ("text",),
    "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass($1) "
    "AND inhparent = 'predictions'::regclass",
    prepare=False,
)
_DETACH_STATE = Statement(
    "inferq_partition_state",
    ("text",),
    "SELECT i.inhdetachpending FROM pg_class c "
    "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = to_regclass($1)",
    prepare=False,
)


def _ddl(text: str, types: tuple[str, ...] = ()) -> Statement:
    return Statement("inferq_partition_ddl", types, text, prepare=False)


def ensure_partition(conn: Connection, run_id: uuid.UUID) -> None:
    """Create and attach the run's partition unless it is there. Created on its own, then
    attached: attaching locks ``predictions`` only against other attaches and detaches
    (SHARE UPDATE EXCLUSIVE), where ``CREATE TABLE ... PARTITION OF`` would block every
    reader of the table for the moment (ACCESS EXCLUSIVE)."""
    name = partition_name(run_id)
    if sql.run(conn, (_ATTACHED, (name,))):
        return
    sql.run(
        conn,
        (_ddl(f'CREATE TABLE IF NOT EXISTS "{name}" (LIKE predictions INCLUDING DEFAULTS)'), ()),
        (
            _ddl(
                f'ALTER TABLE predictions ATTACH PARTITION "{name}" FOR VALUES IN ($1)', ("uuid",)
            ),
            (str(run_id),),
        ),
    )


def drop_partition(run_id: uuid.UUID) -> bool:
    """Drop a run's rows whole: detach its partition concurrently (readers and writers of
    other runs carry on), then drop it. Safe to repeat after an interruption. Returns
    whether there was a partition."""
    from shared.db import autocommit

    name = partition_name(run_id)
    with autocommit() as conn:  # DETACH ... CONCURRENTLY runs outside a transaction
        found = sql.run(conn, (_DETACH_STATE, (name,)))
        if not found:
            return False
        pending = found[0][0]
        if pending is not None:  # still attached (detach pending after an interruption)
            how = "FINALIZE" if pending else "CONCURRENTLY"
            sql.run(conn, (_ddl(f'ALTER TABLE predictions DETACH PARTITION "{name}" {how}'), ()))
        sql.run(conn, (_ddl(f'DROP TABLE IF EXISTS "{name}"'), ()))
        return True
