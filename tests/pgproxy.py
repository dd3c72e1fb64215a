"""A TCP proxy in front of the test PostgreSQL that can lose an answer on purpose.

``lose_next_insert()`` lets the next ``INSERT INTO jobs`` through to the server (which
runs and commits it) and then drops the client's connection before the answer gets back:
exactly what a client sees when the network or the server fails between commit and
reply. ``refuse_for`` makes new connections fail for a while after that, as when the
server is away.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from sqlalchemy.engine import make_url

__all__ = ["PgProxy"]


class PgProxy:
    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        socket_dir = url.query.get("host")
        port = url.port or 5432
        if socket_dir:
            self._target: tuple[int, object] = (socket.AF_UNIX, f"{socket_dir}/.s.PGSQL.{port}")
        else:
            self._target = (socket.AF_INET, (url.host or "127.0.0.1", port))
        self._url = url
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lose_insert = threading.Event()
        self._refuse_for = 0.0
        self._refuse_until = 0.0
        self.inserts_lost = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """The database URL through this proxy."""
        through = self._url.set(host="127.0.0.1", port=self.port, query={})
        return through.render_as_string(hide_password=False)

    def lose_next_insert(self, *, refuse_for: float = 0.0) -> None:
        self._refuse_for = refuse_for
        self._lose_insert.set()

    def refusing(self) -> bool:
        return time.monotonic() < self._refuse_until

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing():
                client.close()
                continue
            family, address = self._target
            server = socket.socket(family, socket.SOCK_STREAM)
            try:
                server.connect(address)  # type: ignore[arg-type]
            except OSError:
                client.close()
                continue
            cut = threading.Event()
            for pump, args in (
                (self._up, (client, server, cut)),
                (self._down, (server, client, cut)),
            ):
                threading.Thread(target=pump, args=args, daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            server.sendall(data)
            if b"INSERT INTO jobs" in data and self._lose_insert.is_set():
                self._lose_insert.clear()
                self.inserts_lost += 1
                self._refuse_until = time.monotonic() + self._refuse_for
                cut.set()  # the answer is dropped; the server still runs the INSERT
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
                client.close()
                time.sleep(2.0)  # long enough for the server to commit
                break
        with contextlib.suppress(OSError):
            server.close()

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                break
            if not data:
                break
            if cut.is_set():
                continue
            try:
                client.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            client.close()
