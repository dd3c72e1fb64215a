"""``inferq up``: the whole stack as supervised child processes on one machine.

Starts embedded PostgreSQL and Redis where no URL is configured, migrates, seeds demo data
and trains the first model versions when the registry is empty, then runs api, worker,
beat and flower, restarting any that crash. Ctrl-C or SIGTERM stops everything, children
first, servers last.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shared.config import STACK_FILE, get_settings
from shared.devstack.embedded import EmbeddedPostgres, EmbeddedRedis

__all__ = ["run_stack", "Child", "stop_process_group"]

RESTART_BACKOFF_MAX_S = 30.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Child:
    """A supervised process: restarted with backoff when it exits on its own."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)
    copier: threading.Thread | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.copier = threading.Thread(
            target=copy_log,
            args=(self.process.stdout, self.log_path, self.name, self.process.pid),
            name=f"log-{self.name}",
            daemon=True,
        )
        self.copier.start()
        self.started_at = time.monotonic()

    def check(self) -> None:
        """Restart the child if it died (backoff doubles up to 30 s; reset after 60 s of life)."""
        if self.process is None or self.process.poll() is None:
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            if now - self.started_at > 60:
                self.restarts = 0
            delay = min(RESTART_BACKOFF_MAX_S, 2.0**self.restarts)
            _say(
                f"inferq: {self.name} exited with {self.process.returncode}; "
                f"restarting in {delay:.0f} s (log: {self.log_path})"
            )
            self.next_start = now + delay
            self.restarts += 1
        elif now >= self.next_start:
            self.next_start = 0.0
            self.start()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout)
        if self.copier is not None:
            self.copier.join(5)  # the last lines (shutdown messages) reach the file


def copy_log(stream: IO[bytes], path: Path, service: str, pid: int) -> None:
    """Copy a child's output into its log file, a JSON object a line: its log lines as
    they are, and anything else it prints (a library's banner or a message written straight
    to the terminal, a warning, a crash) wrapped as one, so every log reads the same way."""
    with open(path, "ab", buffering=0) as log:
        for raw in iter(stream.readline, b""):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if not line.startswith(b"{"):
                now = time.time()
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                line = json.dumps(
                    {
                        "ts": f"{stamp},{int(now % 1 * 1000):03d}",
                        "level": "INFO",
                        "logger": "output",
                        "message": line.decode(errors="replace"),
                        "job_id": None,
                        "process": pid,
                        "service": service,
                    }
                ).encode()
            log.write(line + b"\n")
    stream.close()


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a child started in its own session, then SIGKILL whatever is left in it
    (a prefork pool, say) after ``timeout`` s, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte (mode 0600 at creation)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _secret(path: Path, make) -> str:  # type: ignore[no-untyped-def]
    """A development secret kept under the data dir, so it survives restarts."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    _write_private(path, value + "\n")
    return str(value)


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header(
            "Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _prepare(env: dict[str, str], customers: int) -> None:
    """Migrate; seed and train if the registry is empty (in a child, with the stack's env)."""
    for step in (["migrate"], ["_bootstrap-demo", "--customers", str(customers)]):
        subprocess.run([sys.executable, "-m", "shared.devstack.cli", *step], env=env, check=True)


def run_stack(
    *,
    port: int | None,
    flower_port: int,
    workers: int | None,
    data_dir: Path | None,
    customers: int,
) -> int:
    s = get_settings()
    data_dir = (data_dir or s.data_dir).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    explicit_db = bool(os.environ.get("INFERQ_DATABASE_URL"))
    explicit_redis = bool(os.environ.get("INFERQ_REDIS_URL"))
    pg = None if explicit_db else EmbeddedPostgres(data_dir / "pg")
    redis = None if explicit_redis else EmbeddedRedis(data_dir / "redis")
    children: list[Child] = []
    stopping = False

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        db_url = pg.start() if pg else s.database_url
        redis_url = redis.start() if redis else s.redis_url
        # URLs may carry passwords: readable by this user only.
        _write_private(
            data_dir / STACK_FILE,
            json.dumps({"database_url": db_url, "redis_url": redis_url}) + "\n",
        )
        api_key = s.bootstrap_api_key or _secret(
            data_dir / "dev-api-key", lambda: "iq_dev_" + secrets.token_urlsafe(32)
        )
        flower_password = s.flower_password or _secret(
            data_dir / "flower-password", lambda: secrets.token_urlsafe(18)
        )
        api_port = port or s.api_port
        env = {
            **os.environ,
            "INFERQ_DATA_DIR": str(data_dir),
            "INFERQ_DATABASE_URL": db_url,
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_BOOTSTRAP_API_KEY": api_key,
            "INFERQ_FLOWER_PASSWORD": flower_password,
            "INFERQ_API_PORT": str(api_port),
            "PYTHONUNBUFFERED": "1",
        }
        _prepare(env, customers)
        py = [sys.executable, "-m", "shared.devstack.cli"]
        pool = ["-c", str(workers)] if workers else []
        specs = {
            "api": ["api", "--port", str(api_port)],
            # Two pools, so a training run, a score run or a slow callback never holds up
            # online predictions; each is scaled on its own in a deployment.
            "worker": ["worker", "-Q", "predict", "-n", "predict@%h", *pool],
            "worker-jobs": ["worker", "-Q", "score,ops", "-n", "jobs@%h", *pool],
            "beat": ["beat"],
            "flower": ["flower", "--port", str(flower_port)],
        }
        for name, args in specs.items():
            child = Child(name, py + args, env, logs / f"{name}.log")
            child.start()
            children.append(child)
        api_url = f"http://{s.api_host}:{api_port}"
        flower_url = f"http://127.0.0.1:{flower_port}"
        ready = False
        deadline = time.monotonic() + 120
        while not stopping:
            for child in children:
                child.check()
            if not ready:
                ready = (
                    _get(f"{api_url}/readyz") == 200
                    and _get(flower_url + "/healthcheck", (s.flower_user, flower_password)) == 200
                )
                if ready:
                    print(
                        f"inferq ready api={api_url} docs={api_url}/docs flower={flower_url} "
                        f"api_key={api_key} flower_user={s.flower_user} "
                        f"flower_password={flower_password} logs={logs}",
                        flush=True,
                    )
                elif time.monotonic() > deadline:
                    _say(f"inferq: the stack is not ready after 120 s; see {logs}")
                    deadline = float("inf")
            time.sleep(0.25)
        _say("inferq: stopping")
        return 0
    except subprocess.CalledProcessError as exc:
        _say(f"inferq: set-up step failed: {exc}")
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        if redis:
            redis.stop()
        if pg:
            pg.stop()
        (data_dir / STACK_FILE).unlink(missing_ok=True)
