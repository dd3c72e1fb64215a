"""A real ``mlflow server`` subprocess for tests: tracking, model registry and proxied artifacts.

The backend store is a database URL of the caller's (e.g. an embedded pgserver database);
artifacts and the server's log live under ``base_dir``. The server runs in a process group
of its own, stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared.devstack.embedded import free_port

__all__ = ["MlflowServer"]

START_TIMEOUT_S = 60.0


class MlflowServer:
    """``mlflow server`` on a loopback port (``port``, or a free one), one uvicorn worker,
    no job runner."""

    def __init__(self, base_dir: Path, backend_store_uri: str, port: int = 0) -> None:
        self.base_dir = Path(base_dir)
        self.backend_store_uri = backend_store_uri
        self.log_path = self.base_dir / "mlflow-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = port

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.base_dir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self) -> str:
        """Start the server; return its tracking URI once ``/health`` answers."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._check_backend()
        self.port = self.port or free_port()
        env = {
            **os.environ,
            # With a SQL backend the server would also start a huey job runner (GenAI jobs),
            # more processes that tests do not need.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        # The server must serve the given store, not whatever the test process points at.
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(name, None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"mlflow server exited with {code}:\n{self.log_tail()}")
            if self._healthy():
                return self.tracking_uri
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer /health within {START_TIMEOUT_S:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def _check_backend(self) -> None:
        """Fail fast on a database the server cannot reach: ``mlflow server`` retries the
        connection with exponential backoff for many minutes instead of exiting."""
        if not self.backend_store_uri.startswith(("postgresql", "mysql", "mssql")):
            return
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(self.backend_store_uri, poolclass=NullPool)
        try:
            with engine.connect():
                pass
        except Exception as e:
            raise RuntimeError(f"mlflow backend store unreachable: {e}") from e
        finally:
            engine.dispose()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server's process group (the CLI and its uvicorn child), then SIGKILL."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # The uvicorn child may outlive the CLI; the group id is the CLI's PID either way.
        self._signal_group(proc.pid, signal.SIGKILL)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
