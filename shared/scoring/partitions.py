"""``predictions`` is partitioned by run: each score run writes into a partition of its
own, and an old run is dropped whole (retention) instead of deleted row by row.

A score run writes into its partition while it is a table of its own, with no index and
not yet attached (``create_partition``): a row costs its COPY and nothing else, where
each row into an attached partition also went into its index. The chunk that
completes the run builds the index once, in bulk, and attaches the table
(``attach_partition``), in the transaction that closes the run: readers of
``predictions`` see a run whole or not at all. The table's CHECK constraint on its run
id lets the attach skip the scan that would prove it."""

from __future__ import annotations

import uuid
from datetime import datetime

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


_EXISTS = Statement(
    "inferq_partition_exists",
    ("text",),
    "SELECT 1 WHERE to_regclass($1) IS NOT NULL",
    prepare=False,
)
_HAS_PK = Statement(
    "inferq_partition_pk",
    ("text",),
    "SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'",
    prepare=False,
)
#: For the index builds at a run's close: a million rows' sort fits in memory.
MAINTENANCE_WORK_MEM = "256MB"


def _ddl(text: str, types: tuple[str, ...] = ()) -> Statement:
    return Statement("inferq_partition_ddl", types, text, prepare=False)


def _create(name: str) -> tuple[Statement, tuple[()]]:
    return _ddl(f'CREATE TABLE IF NOT EXISTS "{name}" (LIKE predictions INCLUDING DEFAULTS)'), ()


def _attach(name: str, run_id: uuid.UUID) -> tuple[Statement, tuple[str]]:
    """Attaching locks ``predictions`` only against other attaches and detaches (SHARE
    UPDATE EXCLUSIVE), where ``CREATE TABLE ... PARTITION OF`` would block every reader of
    the table for the moment (ACCESS EXCLUSIVE)."""
    statement = _ddl(
        f'ALTER TABLE predictions ATTACH PARTITION "{name}" FOR VALUES IN ($1)', ("uuid",)
    )
    return statement, (str(run_id),)


def ensure_partition(conn: Connection, run_id: uuid.UUID) -> None:
    """Create and attach the run's partition (indexed as ``predictions`` is) unless it is
    there: for rows written outside a score run."""
    name = partition_name(run_id)
    if not sql.run(conn, (_ATTACHED, (name,))):
        sql.run(conn, _create(name), _attach(name, run_id))


def create_partition(conn: Connection, run_id: uuid.UUID, started_at: datetime) -> None:
    """The run's table to write into, shaped like ``predictions``, with no index and not
    attached (see the module doc); nothing if it is there. Its CHECK holds its rows to the
    run's id and to the run's start as their ``scored_at``: within the table the primary key
    (entity_id, scored_at, run_id) is then unique exactly when ``entity_id`` is."""
    name = partition_name(run_id)
    if sql.run(conn, (_EXISTS, (name,))):
        return
    check = _ddl(
        f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_run" '
        f"CHECK (run_id IS NOT NULL AND run_id = '{run_id}'::uuid "
        f"AND scored_at = '{started_at.isoformat()}'::timestamptz)"
    )
    sql.run(conn, _create(name), (check, ()))


def attach_partition(conn: Connection, run_id: uuid.UUID) -> None:
    """Build the run's one index (that of ``predictions``: its primary key, entity first)
    and attach its table; nothing if it is attached. In the caller's transaction."""
    name = partition_name(run_id)
    if sql.run(conn, (_ATTACHED, (name,))):
        return
    statements = [
        f"SET LOCAL maintenance_work_mem = '{MAINTENANCE_WORK_MEM}'",
        f'CREATE UNIQUE INDEX IF NOT EXISTS "{name}_pkey" ON "{name}" '
        "(entity_id, scored_at, run_id)",
    ]
    sql.run(conn, *((_ddl(text), ()) for text in statements))
    if not sql.run(conn, (_HAS_PK, (name,))):
        pk = f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_pkey" '
        pk += f'PRIMARY KEY USING INDEX "{name}_pkey"'
        sql.run(conn, (_ddl(pk), ()))
    sql.run(conn, _attach(name, run_id))


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
