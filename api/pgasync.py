"""One PostgreSQL connection driven by the API's event loop: psycopg2 in asynchronous mode.

The API records jobs from its event loop, without a thread: psycopg2's asynchronous
connections hand libpq's socket to the loop (``add_reader`` / ``add_writer``), so a batch
waiting for its commit costs no thread hand-over and no GIL contention with the requests
being parsed meanwhile. Asynchronous connections are always in autocommit: one statement
is one transaction, so a multi-row ``INSERT`` is sent, committed (durably: the server's
``synchronous_commit`` applies) and answered in a single round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg2
from psycopg2 import extensions

from shared.sql import Statement

__all__ = ["AsyncConnection"]


class AsyncConnection:
    """``await AsyncConnection.connect(dsn)``, then ``await fetchall(sql)``.

    Not shareable: one statement at a time (callers keep a pool of their own). Any error,
    including ``TimeoutError`` after ``timeout`` seconds, leaves the connection closed;
    the caller connects again.
    """

    def __init__(self, conn: Any, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self._cursor: Any = None

    @classmethod
    async def connect(cls, dsn: str, *, timeout: float = 5.0, **params: Any) -> AsyncConnection:
        conn = psycopg2.connect(dsn, async_=True, **params)
        self = cls(conn, timeout)
        try:
            await self._wait()
        except BaseException:
            self.close()
            raise
        self._cursor = conn.cursor()
        return self

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def mogrify(self, template: str, args: Sequence[Any]) -> bytes:
        """``template`` with ``args`` quoted by libpq's rules, as psycopg2 would send it."""
        return self._cursor.mogrify(template, args)  # type: ignore[no-any-return]

    async def run(self, statement: Statement, *args: Any) -> list[Any]:
        """Run a ``shared.sql.Statement`` with ``args`` (its own transaction)."""
        return await self.fetchall(statement.sql(args, mogrify=self.mogrify, prepared=None))

    async def fetchall(self, sql: bytes | str, args: Sequence[Any] | None = None) -> list[Any]:
        """Run one statement (its own transaction) and return its rows."""
        try:
            self._cursor.execute(sql, args)
            await self._wait()
            return self._cursor.fetchall() if self._cursor.description else []
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    async def _wait(self) -> None:
        """Drive libpq until the current operation is complete."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            while True:
                state = self._conn.poll()
                fd = self._conn.fileno()  # may change while connecting
                if state == extensions.POLL_OK:
                    return
                if state == extensions.POLL_READ:
                    watch, unwatch = loop.add_reader, loop.remove_reader
                elif state == extensions.POLL_WRITE:
                    watch, unwatch = loop.add_writer, loop.remove_writer
                else:  # pragma: no cover - libpq documents no other state
                    raise psycopg2.OperationalError(f"unexpected poll state {state}")
                ready = loop.create_future()
                watch(fd, _resolve, ready)
                try:
                    await ready
                finally:
                    unwatch(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
