"""``predictions`` is partitioned by run: each score run writes into a partition of its
own, and an old run is dropped whole (retention) instead of deleted row by row.

A run's partition is itself partitioned, by entity range, into one table per chunk. The
chunk's transaction creates its table with no index and not attached, COPYs its rows in
(a row costs its COPY and nothing else), then builds the table's primary key in bulk
(``chunk_table_statements``, ``chunk_index_statements``): the index builds run in the
chunks, side by side on every worker, instead of one build over the whole run at its
close. A chunk's table holds the run's constants (run id, model, version, ``scored_at``)
as its column defaults, so the COPY carries only what differs per row, and a CHECK that
holds its rows to them and to the chunk's entity range. The chunk that completes the run
attaches every chunk's table to the run's table and that one to ``predictions``
(``attach_partition``), in the transaction that closes the run: readers of
``predictions`` see a run whole or not at all. The CHECKs let each attach skip the scan
that would prove it.

A run planned before chunk tables has a plain table as its partition (``relkind`` 'r'):
its chunks still write into it, and its close builds the index over the whole table."""

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


def chunk_table_name(run_id: uuid.UUID, chunk: int) -> str:
    """One chunk's table, a partition of the run's once the run closes."""
    return f"predictions_{run_id.hex}_{chunk}"


def create_partition(conn: Connection, run_id: uuid.UUID) -> None:
    """The run's table, shaped like ``predictions`` with its primary key, partitioned by
    entity range for its chunks' tables, not attached (see the module doc); nothing if it
    is there."""
    name = partition_name(run_id)
    if sql.run(conn, (_EXISTS, (name,))):
        return
    create = f'CREATE TABLE "{name}" (LIKE predictions INCLUDING DEFAULTS INCLUDING INDEXES) '
    sql.run(conn, (_ddl(create + "PARTITION BY RANGE (entity_id)"), ()))


def _literal(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def chunk_table_statements(
    run_id: uuid.UUID,
    chunk: int,
    lo: int,
    hi: int,
    *,
    started_at: datetime,
    model: str,
    version: int,
) -> list[str]:
    """The chunk's table, before its COPY of ``pgcopy.OWN_COLUMNS``: the run's constants
    as its defaults, and a CHECK holding its rows to them and to ids ``lo`` to ``hi``.
    Within the table the primary key (entity_id, scored_at, run_id) is then unique exactly
    when ``entity_id`` is."""
    name = chunk_table_name(run_id, chunk)
    run, ts = f"{_literal(run_id)}::uuid", f"{_literal(started_at.isoformat())}::timestamptz"
    return [
        f'CREATE TABLE "{name}" (LIKE predictions INCLUDING DEFAULTS)',
        f'ALTER TABLE "{name}" ALTER run_id SET DEFAULT {run}, '
        f"ALTER model SET DEFAULT {_literal(model)}, ALTER version SET DEFAULT {int(version)}, "
        f"ALTER scored_at SET DEFAULT {ts}, "
        f'ADD CONSTRAINT "{name}_rows" CHECK (run_id = {run} AND scored_at = {ts} '
        f"AND entity_id >= {int(lo)} AND entity_id < {int(hi) + 1})",
    ]


def chunk_index_statements(run_id: uuid.UUID, chunk: int) -> list[str]:
    """After the chunk's COPY: its primary key, built once over its rows (a second row for
    an entity fails it, and the chunk with it)."""
    name = chunk_table_name(run_id, chunk)
    return [
        f"SET LOCAL maintenance_work_mem = '{MAINTENANCE_WORK_MEM}'",
        # The other chunks keep the cores busy: a helper process per build only adds its
        # start-up and the hand-over of its sorted run.
        "SET LOCAL max_parallel_maintenance_workers = 0",
        f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_pkey" '
        "PRIMARY KEY (entity_id, scored_at, run_id)",
    ]


_KIND = Statement(
    "inferq_partition_kind",
    ("text",),
    "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
    prepare=False,
)
#: The chunks that wrote a table (an empty chunk writes none). Only the close attaches
#: them, in one transaction with the run's own attach: none is attached before it.
_CHUNK_TABLES = Statement(
    "inferq_chunk_tables",
    ("uuid", "text"),
    "SELECT c.chunk, c.lo, c.hi FROM scoring_chunks c "
    "WHERE c.run_id = $1 AND to_regclass($2 || c.chunk) IS NOT NULL ORDER BY c.chunk",
    prepare=False,
)


def partition_kind(conn: Connection, run_id: uuid.UUID) -> str | None:
    """'p' for a run's table of chunk tables, 'r' for a run planned before them (one
    plain table), None if the run has no table."""
    found = sql.run(conn, (_KIND, (partition_name(run_id),)))
    return found[0][0] if found else None


def attach_partition(conn: Connection, run_id: uuid.UUID) -> None:
    """Attach every chunk's table to the run's table and that one to ``predictions``;
    nothing if it is attached. In the caller's transaction."""
    name = partition_name(run_id)
    if sql.run(conn, (_ATTACHED, (name,))):
        return
    statements: list[tuple[Statement, tuple[()]]] = []
    if partition_kind(conn, run_id) == "r":
        _index_whole(conn, name)
    else:
        for chunk, lo, hi in sql.run(conn, (_CHUNK_TABLES, (str(run_id), f"{name}_"))):
            table = chunk_table_name(run_id, chunk)
            attach = f'ALTER TABLE "{name}" ATTACH PARTITION "{table}" '
            statements.append((_ddl(attach + f"FOR VALUES FROM ({lo}) TO ({hi + 1})"), ()))
    sql.run(conn, *statements, _attach(name, run_id))  # one round trip


def _index_whole(conn: Connection, name: str) -> None:
    """A run's plain table (planned before chunk tables): its index, built at the close."""
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
