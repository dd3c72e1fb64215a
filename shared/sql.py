"""Hand-written SQL: statements with ``$n`` parameters, several sent as one round trip.

Everything that is not the ORM (``shared.orm`` models with ``select`` / ``update``) goes
through here: the hot paths' statements (claim, settle, prediction logs) and the queries
over users' own tables, whose names are only known at run time.

``Statement.sql`` renders the text that runs a statement with given arguments, quoted by
psycopg2's own adaptation as execute would. A statement whose plan cannot go wrong (an
``INSERT ... SELECT FROM unnest(...)``) is prepared once per connection and then run with
``EXECUTE``, so PostgreSQL skips the planner; set ``INFERQ_DB_PREPARE=false`` behind a
transaction-pooling PgBouncer, which cannot keep a session's prepared statements.

Statements that look rows up (the claim, the settle) are always sent with their arguments
inlined: PostgreSQL caches a generic plan for a prepared statement after five calls, made
without knowing the array's length and with the statistics of that moment. On a jobs table
that grows from empty it chose a sequential scan and kept it (3 ms a call at 24,000 rows);
inlined, each call is planned with the table's real size and the array's real length.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import psycopg2
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from shared.config import get_settings

__all__ = ["Statement", "run", "inline"]

_PARAM = re.compile(r"\$(\d+)")


class Statement:
    """One statement: ``name``, ``$n`` parameters of the given PostgreSQL ``types``;
    ``prepare`` only where any plan of it is a good plan (see above)."""

    def __init__(self, name: str, types: Sequence[str], sql: str, *, prepare: bool) -> None:
        self.name = name
        self.prepare = prepare
        self.types = tuple(types)
        casts = ", ".join(f"%s::{t}" for t in self.types)
        self._call = f"EXECUTE {name}({casts})"
        # Inline form: each $n becomes a quoted argument with its cast (a literal '%', as in
        # a quoted identifier, is escaped for the quoting).
        self._inline = _PARAM.sub(
            lambda m: f"%s::{self.types[int(m.group(1)) - 1]}", sql.replace("%", "%%")
        )
        self._order = [int(m.group(1)) - 1 for m in _PARAM.finditer(sql)]
        self._prepare = f"PREPARE {name}({', '.join(self.types)}) AS {sql}"

    def sql(
        self,
        args: Sequence[Any],
        *,
        mogrify: Callable[[str, Sequence[Any]], bytes],
        prepared: set[str] | None,
    ) -> str:
        """The text that runs this statement with ``args``. ``prepared`` is the set of
        names prepared on the connection (None: do not prepare); when this one is missing
        the returned text prepares it first, in the same round trip, and counts it as
        prepared: a caller whose statement fails drops the connection, and its set."""
        if prepared is None or not self.prepare or not get_settings().db_prepare:
            return mogrify(self._inline, [args[i] for i in self._order]).decode()
        call = mogrify(self._call, args).decode()
        if self.name in prepared:
            return call
        prepared.add(self.name)
        return f"{self._prepare};\n{call}"


def run(conn: Connection, *statements: tuple[Statement, Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Run ``statements`` in one round trip (one simple query: one transaction on an
    autocommit connection) and return the last one's rows. Any failure invalidates the
    connection, so what it had prepared is never assumed again; psycopg2's errors come
    out as SQLAlchemy's (``OperationalError`` for a lost server), as from any query."""
    dbapi = conn.connection
    prepared: set[str] = dbapi.info.setdefault("inferq_prepared", set())
    cur = dbapi.cursor()
    try:
        text = ";\n".join(
            s.sql(args, mogrify=cur.mogrify, prepared=prepared) for s, args in statements
        )
        # No arguments: the text is final, and a '%' in a quoted value stays a '%'.
        cur.execute(text)
        return list(cur.fetchall()) if cur.description else []
    except psycopg2.Error as exc:
        conn.invalidate()
        raise DBAPIError.instance(None, None, exc, psycopg2.Error) from exc
    except BaseException:
        conn.invalidate()
        raise
    finally:
        with contextlib.suppress(Exception):
            cur.close()


def inline(conn: Connection, template: str, params: Any) -> str:
    """``template`` (psycopg2's ``%(name)s`` placeholders) with ``params`` quoted into it:
    for a fragment of SQL built at run time (a segment's filters), to go into a
    ``Statement`` or a COPY, which take no parameters."""
    cur = conn.connection.cursor()
    try:
        return cur.mogrify(template, params).decode()
    finally:
        cur.close()
