"""A data team's own model on the stack as users start it: online jobs and a population score.

    .venv/bin/python -m bench.own_model_bench [--rows 1000000] [--clients 32] [--duration 10]

load_bench and score_bench measure the built-in churn pipeline (categories as codes, run on
onnxruntime) on a stack each benchmark assembles itself (rate limit off, WARNING logs). The
models users bring look like ``tests.factories.gbt_pipeline``: a ColumnTransformer with a
OneHotEncoder on string columns and a HistGradientBoostingClassifier, fitted on a pandas
DataFrame, registered through the API as a skops file and scored over a table of their
own. This measures what such a model gets from ``inferq up`` with its defaults (embedded
PostgreSQL and Redis, api, worker, beat and Flower, INFO logs, the rate limit on: the
online load uses a key of its own whose rate admits it), and holds every figure against
the same pipeline's bare ``predict_proba`` in this process on the same rows, so the
cost of the service around the model shows:

1. Setup (not timed): ``inferq up`` in a temporary data directory; fit
   ``gbt_pipeline(accounts(20000))``; create ``bench_accounts`` in the stack's database and
   COPY ``--rows`` rows of ``accounts(N)`` into it; register the pipeline through
   ``POST /v1/models/{name}/versions`` (skops bytes, a 200-row sample, its untrusted types
   trusted, the table as its feature table, promoted).
2. Online: one-row predict jobs, every row a different one of the table's distribution,
   ``--clients`` clients in a closed loop (load_bench's aiohttp generator) for ``--duration``
   seconds: jobs/s end to end and completion latency. Beside it, bare ``predict_proba`` on
   the same rows, one row per call as a DataFrame (what one task per request pays) and all
   of them in one call; and the version as the workers load it (its runtime chosen the
   same way), one JSON row per call.
3. Score: one score job over the whole table, POST to ``succeeded``, every prediction counted.
   Beside it, bare ``predict_proba`` on the same rows read into a DataFrame, in chunks of
   inferq's chunk size, in one process and split across two (one thread each): the two-core
   machine's bare throughput; and the workers' runtime on the same rows as the codes a
   score chunk reads, in one process.

The stack is stopped with SIGINT to its process group, as Ctrl-C stops ``inferq up``, also
when the benchmark fails or is interrupted. The exit status is 1 when a job fails or a count
does not match. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.load_bench import (
    ROOT,
    THREAD_VARS,
    WARMUP_S,
    CpuMeter,
    HttpStatusError,
    PhaseResult,
    Target,
    _cpu_line,
    _errors,
    _lat,
    closed_loop,
    code_version,
    inferq_target,
    ledger_breakdown,
    machine,
    ms,
    pct,
    scan_log,
    warm,
)
from bench.score_bench import CpuAccount, children, count_predictions, cpu_note

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.pipeline import Pipeline

MODEL = "accounts-gbt"
TABLE = "bench_accounts"
TABLE_DDL = (
    f"CREATE TABLE {TABLE} (account_id bigint PRIMARY KEY, age integer, "
    "income double precision, plan text, region text, tickets smallint)"
)
TRAIN_ROWS = 20_000
SAMPLE_ROWS = 200
CHECK_ROWS = 100
#: Seeds of accounts(): the training set uses the default (0); the table, the online rows and
#: the check job each get rows of their own from the same distribution.
TABLE_SEED, ONLINE_SEED, CHECK_SEED = 7, 11, 13
#: Online rows are drawn for this many jobs/s over the run; past that a row is sent twice.
ROW_POOL_RATE = 3_000
COPY_ROWS = 100_000
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
SCORE_TIMEOUT_S = 3_600.0
_LOADED = re.compile(r"loaded (\S+) v(\d+) \(runtime (\w+(?:, compiled trees)?)\)")
#: Lines of the supervisor's own output worth showing: its notices and anything above INFO.
_NOTABLE = re.compile(r'^inferq: |"level": "(WARNING|ERROR|CRITICAL)"|Traceback|Error\b')
_PG_PROBLEM = re.compile(r"\b(WARNING|ERROR|FATAL|PANIC):")


def say(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --- the stack ---------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    return ""


def _environ(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/environ").read_bytes()
    return b""


def _cwd(pid: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/cwd")
    return ""


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and _ppid(pid) != 0


#: Requests/s of a load generator's key: above anything two cores serve.
LOAD_KEY_RATE = 100_000.0


@dataclass
class Stack:
    """``inferq up`` started as a user starts it, in a process group of its own."""

    data_dir: Path
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready_line: str = ""
    ready_s: float = 0.0
    api: str = ""
    api_key: str = ""
    database_url: str = ""
    redis_url: str = ""
    _started: float = 0.0
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        data_dir: Path,
        env: dict[str, str],
        port: int,
        flower_port: int,
        extra: tuple[str, ...] = (),
    ) -> Stack:
        args = [sys.executable, "-m", "shared.devstack.cli", "up", "--port", str(port)]
        args += ["--flower-port", str(flower_port), "--data-dir", str(data_dir), *extra]
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        stack = cls(data_dir, popen, _started=time.perf_counter())
        stack._reader = threading.Thread(target=stack._read, daemon=True)
        stack._reader.start()
        return stack

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            if line.startswith("inferq ready") and not self._ready.is_set():
                self.ready_line = line
                self.ready_s = time.perf_counter() - self._started
                fields = dict(tok.split("=", 1) for tok in line.split()[2:] if "=" in tok)
                self.api, self.api_key = fields.get("api", ""), fields.get("api_key", "")
                self._ready.set()
            else:
                self.lines.append(line)

    def wait_ready(self, timeout: float) -> None:
        from shared.config import STACK_FILE

        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.5):
            if self.popen.poll() is not None:
                tail = "\n".join(self.lines[-20:])
                raise RuntimeError(f"inferq up exited with {self.popen.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'inferq ready' line after {timeout:.0f} s")
        if not (self.api and self.api_key):
            raise RuntimeError(f"cannot read api= and api_key= from: {self.ready_line}")
        stack = json.loads((self.data_dir / STACK_FILE).read_text())
        self.database_url = str(stack["database_url"])
        self.redis_url = str(stack["redis_url"])

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def cli(self, *args: str) -> str:
        """``inferq ARGS`` against this stack (its data directory names the servers)."""
        out = subprocess.run(
            [sys.executable, "-m", "shared.devstack.cli", *args],
            cwd=ROOT,
            env={**stack_env()[0], "INFERQ_DATA_DIR": str(self.data_dir)},
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        return out.stdout

    def load_key(self, rate: float = LOAD_KEY_RATE) -> str:
        """A key of its own for a load generator, whose rate admits the load: the rate
        limit stays on and is checked on every request, as for any tenant, but the dev
        key's default (INFERQ_RATE_LIMIT_PER_S) would turn a benchmark's load into 429s.
        Same tenant as the dev key, so it sees the same rows and jobs."""
        # The dev key's tenant, "default": the demo rows are its own.
        return self.cli("keys", "create", "--tenant", "default", "--rate", f"{rate:g}").strip()

    def postmaster(self) -> int | None:
        """The embedded postmaster's pid (pg_ctl starts it outside our process tree)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        return None

    def roots(self) -> dict[str, int]:
        """Named process trees of the stack: its children by what they run, and Postgres."""
        out: dict[str, int] = {}
        for pid in children(self.pid):
            cmd = _cmdline(pid).split()
            if any("redis-server" in part for part in cmd):
                out["redis"] = pid
            elif "shared.devstack.cli" in cmd and cmd.index("shared.devstack.cli") + 1 < len(cmd):
                name = cmd[cmd.index("shared.devstack.cli") + 1]
                if name == "worker" and "-Q" in cmd[:-1]:  # two pools: name each by its queues
                    name = f"worker {cmd[cmd.index('-Q') + 1]}"
                out[name] = pid
        pg = self.postmaster()
        if pg and _alive(pg):
            ancestor = pg
            while ancestor > 1 and ancestor != self.pid:
                ancestor = _ppid(ancestor)
            if ancestor != self.pid:  # not already inside one of the trees above
                out["postgres"] = pg
        return out

    def stop(self) -> list[str]:
        """SIGINT to its process group (Ctrl-C), wait for it to exit; then anything of ours
        that survived it is named and killed by pid."""
        notes: list[str] = []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
        try:
            if self.popen.poll() is None:
                say("stopping inferq up (SIGINT to its process group) ...")
                t0 = time.perf_counter()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGINT)
                try:
                    self.popen.wait(STOP_TIMEOUT_S)
                    notes.append(
                        f"stopped {time.perf_counter() - t0:.1f} s after SIGINT, "
                        f"exit status {self.popen.returncode}"
                    )
                except subprocess.TimeoutExpired:
                    notes.append(f"still running {STOP_TIMEOUT_S:.0f} s after SIGINT: SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    self.popen.wait()
            if self._reader is not None:
                self._reader.join(5)
            for pid, cmd in self.leftovers():
                notes.append(f"LEFT BEHIND: pid {pid} ({cmd[:120]}); killed")
                _kill(pid)
        finally:
            signal.signal(signal.SIGINT, previous)
        return notes

    def leftovers(self) -> list[tuple[int, str]]:
        """Live processes started for this stack: their command line or working directory
        is under its data directory (Postgres, Redis) or their environment names it (api,
        worker, beat, flower and their pool processes)."""
        mark = str(self.data_dir)
        env_mark = f"INFERQ_DATA_DIR={mark}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            cmd = _cmdline(pid)
            if cmd and (mark in cmd or _cwd(pid).startswith(mark) or env_mark in _environ(pid)):
                found.append((pid, cmd.strip()))
        return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def stack_env() -> tuple[dict[str, str], list[str]]:
    """This environment without INFERQ_* settings, so ``inferq up`` runs on its defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    return env, sorted(set(os.environ) - set(env))


# --- setup -------------------------------------------------------------------------------


def load_table(frame: pd.DataFrame) -> float:
    """CREATE TABLE bench_accounts and COPY ``frame`` into it; VACUUM ANALYZE, as a table a
    team keeps would be. Returns the seconds it took."""
    from shared.db import get_engine
    from tests.factories import FEATURES

    t0 = time.perf_counter()
    raw = get_engine().raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(TABLE_DDL)
        columns = ", ".join(FEATURES)
        for lo in range(0, len(frame), COPY_ROWS):
            buf = io.StringIO(frame[FEATURES].iloc[lo : lo + COPY_ROWS].to_csv(header=False))
            cur.copy_expert(f"COPY {TABLE} (account_id, {columns}) FROM STDIN CSV", buf)
        raw.commit()
    finally:
        raw.close()
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {TABLE}")
    return time.perf_counter() - t0


def close_db() -> None:
    """Close this process's connections to the stack's database (shared.db's engine)."""
    from shared.db import dispose_engine, get_engine

    get_engine().dispose()
    dispose_engine()


def register(client: Any, pipeline: Pipeline, train: pd.DataFrame) -> dict[str, Any]:
    from tests.factories import FEATURES, plain_rows, skops_bytes, upload

    blob, untrusted = skops_bytes(pipeline)
    r = upload(
        client,
        MODEL,
        blob,
        sample=plain_rows(train[FEATURES].head(SAMPLE_ROWS)),
        trusted=untrusted,
        feature_table=TABLE,
        key="account_id",
        promote=True,
    )
    if r.status_code != 201:
        raise RuntimeError(f"registering {MODEL} answered {r.status_code}: {r.text[:500]}")
    return {**r.json(), "artifact_bytes": len(blob), "trusted": untrusted}


def check_job(client: Any, pipeline: Pipeline) -> tuple[int, float]:
    """One predict job of CHECK_ROWS rows: (rows whose score differs from bare predict_proba,
    the largest difference). Also loads the model in one worker process."""
    import numpy as np

    from tests.factories import FEATURES, accounts, plain_rows

    frame = accounts(CHECK_ROWS, seed=CHECK_SEED)[FEATURES]
    r = client.post("/v1/jobs", json={"model": MODEL, "inputs": plain_rows(frame)})
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:500]}")
    job = r.json()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"the check job ended {job['status']}: {job.get('error')}")
    got = np.array([p["score"] for p in job["result"]["predictions"]])
    want = pipeline.predict_proba(frame)[:, 1]
    return int((got != want).sum()), float(np.abs(got - want).max())


# --- online ------------------------------------------------------------------------------


@dataclass
class RowFeed:
    """The online rows: each submit takes the next one; past the end it starts again."""

    pool: list[dict[str, Any]]
    used: int = 0

    def __call__(self) -> dict[str, Any]:
        row = self.pool[self.used % len(self.pool)]
        self.used += 1
        return row

    @property
    def sent(self) -> list[dict[str, Any]]:
        return self.pool[: self.used]


def accounts_target(base: str, api_key: str, feed: RowFeed) -> Target:
    """load_bench's inferq target (its long-poll ``wait``) submitting ``MODEL`` jobs:
    the churn row closed_loop hands each submit is replaced by the feed's next row."""
    headers = {"Authorization": f"Bearer {api_key}"}

    async def submit(session: Any, _churn_row: dict[str, Any]) -> str:
        body = {"model": MODEL, "inputs": [feed()]}
        async with session.post(f"{base}/v1/jobs", json=body, headers=headers) as resp:
            if resp.status != 202:
                raise HttpStatusError("POST /v1/jobs", resp.status, await resp.text())
            return str((await resp.json())["id"])

    return dataclasses.replace(inferq_target(base, api_key), name=MODEL, submit=submit)


async def online(target: Target, clients: int, duration: float) -> PhaseResult:
    await warm(target, clients)  # the model in both pool processes, connections open
    return await closed_loop(target, CpuMeter(target.roots), clients, duration)


@dataclass
class Bare:
    rows: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: CpuAccount | None = None
    per_process: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")


def bare_one_row(pipeline: Pipeline, rows: list[dict[str, Any]]) -> Bare:
    """predict_proba on a one-row DataFrame per row, the DataFrame built in the timing."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    res = Bare(rows=len(rows), cpu=CpuAccount([os.getpid()]))
    with threadpool_limits(1), res.cpu:
        pipeline.predict_proba(pd.DataFrame([rows[0]]))
        for row in rows:
            t0 = time.perf_counter()
            pipeline.predict_proba(pd.DataFrame([row]))
            res.latencies.append(time.perf_counter() - t0)
    res.seconds = sum(res.latencies)
    return res


def bare_one_call(pipeline: Pipeline, rows: list[dict[str, Any]]) -> Bare:
    import pandas as pd
    from threadpoolctl import threadpool_limits

    frame = pd.DataFrame(rows)
    res = Bare(rows=len(rows))
    with threadpool_limits(1):
        t0 = time.perf_counter()
        pipeline.predict_proba(frame)
        res.seconds = time.perf_counter() - t0
    return res


def worker_runtime(version: int) -> Any:
    """The registered version loaded as a worker loads it (its runtime chosen the same way)."""
    from shared.db import session_scope
    from shared.models.registry import ModelCache

    with session_scope() as session:
        return ModelCache().get(session, MODEL, version)


def runtime_one_row(model: Any, rows: list[dict[str, Any]]) -> Bare:
    """The worker's runtime on one row per call, from the JSON row (as a batch of one)."""
    from threadpoolctl import threadpool_limits

    res = Bare(rows=len(rows))
    with threadpool_limits(1):
        model.predict_rows([rows[0]])
        for row in rows:
            t0 = time.perf_counter()
            model.predict_rows([row])
            res.latencies.append(time.perf_counter() - t0)
    res.seconds = sum(res.latencies)
    return res


def runtime_score_one(model: Any, frame: pd.DataFrame, chunk_rows: int) -> Bare:
    """The worker's runtime over the table's codes (as a score chunk reads them), in chunks,
    one process, one thread; only the calls timed."""
    from threadpoolctl import threadpool_limits

    from shared.models.encoding import encode_rows
    from tests.factories import plain_rows

    codes = encode_rows(plain_rows(frame), model.schema)
    res = Bare(rows=len(frame))
    with threadpool_limits(1):
        model.predict_codes(codes[:100])
        for lo in range(0, len(codes), chunk_rows):
            t0 = time.perf_counter()
            model.predict_codes(codes[lo : lo + chunk_rows])
            res.seconds += time.perf_counter() - t0
    return res


# --- score -------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    seconds: float = 0.0
    job: dict[str, Any] = field(default_factory=dict)
    counted: tuple[int, int] = (0, 0)
    cpu: CpuAccount | None = None


def score_job(client: Any, roots: list[int]) -> ScoreResult:
    res = ScoreResult(cpu=CpuAccount(roots))
    close_db()  # no idle connection of ours during the run
    with res.cpu:
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json={"type": "score", "model": MODEL})
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs (score) answered {r.status_code}: {r.text[:500]}")
        job = r.json()
        deadline = time.monotonic() + SCORE_TIMEOUT_S
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            r = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})
            if r.status_code != 200:
                raise RuntimeError(f"GET /v1/jobs/{{id}} answered {r.status_code}: {r.text[:300]}")
            job = r.json()
        res.seconds = time.perf_counter() - t0
    res.job = job
    if job["status"] == "succeeded":
        res.counted = count_predictions(job["id"])
    return res


def read_table() -> pd.DataFrame:
    """The table's rows, in key order, as the DataFrame the pipeline was fitted on."""
    import pandas as pd

    from shared.db import get_engine
    from tests.factories import FEATURES

    raw = get_engine().raw_connection()
    try:
        buf = io.StringIO()
        query = f"SELECT account_id, {', '.join(FEATURES)} FROM {TABLE} ORDER BY account_id"
        raw.cursor().copy_expert(f"COPY ({query}) TO STDOUT CSV", buf)
    finally:
        raw.close()
    buf.seek(0)
    return pd.read_csv(buf, header=None, names=["account_id", *FEATURES], index_col=0)


def _predict_chunks(pipeline: Pipeline, frame: pd.DataFrame, chunk_rows: int) -> float:
    """Seconds spent in predict_proba over ``frame`` in chunks (slicing not timed)."""
    chunks = [frame.iloc[lo : lo + chunk_rows] for lo in range(0, len(frame), chunk_rows)]
    busy = 0.0
    for chunk in chunks:
        t0 = time.perf_counter()
        pipeline.predict_proba(chunk)
        busy += time.perf_counter() - t0
    return busy


def bare_score_one(pipeline: Pipeline, frame: pd.DataFrame, chunk_rows: int) -> Bare:
    from threadpoolctl import threadpool_limits

    res = Bare(rows=len(frame), cpu=CpuAccount([os.getpid()]))
    with threadpool_limits(1), res.cpu:
        pipeline.predict_proba(frame.iloc[:100])
        res.seconds = _predict_chunks(pipeline, frame, chunk_rows)
    return res


def _bare_process(
    pipeline: Pipeline, part: pd.DataFrame, chunk_rows: int, barrier: Any, out: Any
) -> None:
    """One of the two bare processes: one thread; starts with the other at the barrier."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        pipeline.predict_proba(part.iloc[:100])
        barrier.wait(300)
        start = time.clock_gettime(time.CLOCK_MONOTONIC)  # system-wide: comparable across
        busy = _predict_chunks(pipeline, part, chunk_rows)
        end = time.clock_gettime(time.CLOCK_MONOTONIC)
    out.put((start, end, busy))


def bare_score_two(pipeline: Pipeline, frame: pd.DataFrame, chunk_rows: int) -> Bare:
    """The same rows split in two halves, one process each (spawned: one BLAS/OpenMP thread
    from the environment set before numpy loaded). Span from the first start to the last end."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    half = len(frame) // 2
    parts = [frame.iloc[:half], frame.iloc[half:]]
    procs = [
        ctx.Process(target=_bare_process, args=(pipeline, p, chunk_rows, barrier, out))
        for p in parts
    ]
    res = Bare(rows=len(frame), cpu=CpuAccount([os.getpid()]))
    got: list[tuple[float, float, float]] = []
    try:
        with res.cpu:
            for p in procs:
                p.start()
            while len(got) < len(procs):
                try:
                    got.append(out.get(timeout=1))
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(
                            f"a bare predict process exited with {dead[0].exitcode}"
                        ) from None
            for p in procs:
                p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    res.seconds = max(e for _, e, _ in got) - min(s for s, _, _ in got)
    res.per_process = [b for _, _, b in got]
    return res


# --- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    dropped_env: list[str]
    machine: str = ""
    code: str = ""
    setup: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    check: tuple[int, float] | None = None
    online: PhaseResult | None = None
    online_roots: list[str] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    feed: RowFeed | None = None
    one_row: Bare | None = None
    one_call: Bare | None = None
    runtime_name: str = ""
    runtime_row: Bare | None = None
    runtime_score: Bare | None = None
    score: ScoreResult | None = None
    chunk_rows: int = 0
    score_one: Bare | None = None
    score_two: Bare | None = None
    stack_notes: list[str] = field(default_factory=list)
    stack_lines: list[str] = field(default_factory=list)
    pg_problems: list[str] = field(default_factory=list)
    ready_s: float = 0.0
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtimes: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def measure(run: Run, stack: Stack) -> None:
    """Everything between ``inferq ready`` and the stop; fills ``run`` as it goes."""
    import httpx

    from shared.config import Settings
    from tests.factories import FEATURES, accounts, gbt_pipeline, plain_rows

    args = run.args
    n = args.rows
    run.chunk_rows = int(Settings.model_fields["score_chunk_rows"].default)  # inferq's default
    say(f"fitting gbt_pipeline(accounts({TRAIN_ROWS})) while inferq up starts ...")
    t0 = time.perf_counter()
    train = accounts(TRAIN_ROWS)
    pipeline = gbt_pipeline(train)
    fit_s = time.perf_counter() - t0
    table = accounts(n, seed=TABLE_SEED)
    pool_n = int(ROW_POOL_RATE * (args.duration + WARMUP_S + 3)) + 2 * args.clients
    pool = accounts(pool_n, seed=ONLINE_SEED)[FEATURES].drop_duplicates()
    feed = RowFeed(plain_rows(pool))
    run.feed = feed

    stack.wait_ready(READY_TIMEOUT_S)
    run.ready_s = stack.ready_s
    say(f"inferq ready after {stack.ready_s:.0f} s at {stack.api}; loading {n:,} rows ...")
    os.environ["INFERQ_DATABASE_URL"] = stack.database_url  # this process's shared.db
    load_s = load_table(table)
    run.setup.append(f"fit     : {TRAIN_ROWS:,} rows in {fit_s:.1f} s in this process")
    run.setup.append(
        f"table   : {TABLE}, {n:,} rows of accounts({n}, seed={TABLE_SEED}) by COPY, "
        f"VACUUM ANALYZE, in {load_s:.1f} s (not part of the benchmark)"
    )
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.api, headers=headers, timeout=120) as client:
        run.model = register(client, pipeline, train)
        run.check = check_job(client, pipeline)

        say(f"online: {args.clients} clients, {args.duration:g} s after {WARMUP_S:g} s ...")
        target = accounts_target(stack.api, stack.load_key(), feed)
        target.roots = stack.roots()
        run.online_roots = list(target.roots)
        run.online = asyncio.run(online(target, args.clients, args.duration))
        run.ledger = ledger_breakdown([run.online])
        if run.online.errors:
            run.failures.append(f"online: {_errors(run.online)}")

        sent = feed.sent
        say(f"bare predict_proba on {min(len(sent), args.bare_rows):,} rows one at a time ...")
        run.one_row = bare_one_row(pipeline, sent[: args.bare_rows])
        run.one_call = bare_one_call(pipeline, sent)
        model = worker_runtime(int(run.model["version"]))
        run.runtime_name = model.runtime + (", compiled trees" if model.compiled_trees else "")
        run.runtime_row = runtime_one_row(model, sent[: args.bare_rows])

        say(f"score job over {n:,} rows ...")
        pg = stack.postmaster()
        run.score = score_job(client, [os.getpid(), stack.pid, *([pg] if pg else [])])
    job = run.score.job
    if job.get("status") != "succeeded":
        run.failures.append(f"score job ended {job.get('status')}: {job.get('error')}")
    else:
        scored = (job.get("result") or {}).get("rows_scored")
        if run.score.counted != (n, n) or scored != n:
            run.failures.append(
                f"score counts: rows_scored {scored}, {run.score.counted[0]:,} predictions, "
                f"{run.score.counted[1]:,} distinct ids, want {n:,}"
            )

    say("bare predict_proba over the table: 1 process, then 2 ...")
    frame = read_table()[FEATURES]
    if len(frame) != n:
        run.failures.append(f"read {len(frame):,} rows back from {TABLE}, want {n:,}")
    run.score_one = bare_score_one(pipeline, frame, run.chunk_rows)
    run.runtime_score = runtime_score_one(model, frame, run.chunk_rows)
    run.score_two = bare_score_two(pipeline, frame, run.chunk_rows)


def collect_logs(run: Run, stack: Stack) -> None:
    for path in sorted((stack.data_dir / "logs").glob("*.log")):
        run.logs[path.stem] = scan_log(path)
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                m = _LOADED.search(line)
                if m and m.group(1) == MODEL:
                    run.runtimes.add(m.group(3))
    run.stack_lines = [line for line in stack.lines if line.strip()]
    with contextlib.suppress(OSError):
        text = (stack.data_dir / "pg" / "log").read_text(errors="replace")
        run.pg_problems = [line for line in text.splitlines() if _PG_PROBLEM.search(line)]


# --- report ------------------------------------------------------------------------------


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v == v else "n/a"


def report(run: Run) -> str:  # noqa: C901 - one section per phase, each optional
    from shared.config import Settings

    args, out = run.args, []
    out.append(
        "inferq own-model benchmark: a DataFrame pipeline registered through `inferq up`'s API, "
        "online jobs and a score job over its feature table, against bare predict_proba"
    )
    out.append(run.machine)
    if run.one_row is not None and run.one_row.latencies:
        lat = run.one_row.latencies
        out.append(
            f"single-thread speed: bare one-row predict_proba of this pipeline p50 "
            f"{ms(pct(lat, 50))}, p99 {ms(pct(lat, 99))} (this process, one thread)"
        )
    out.append(run.code)
    out.append(
        f"args: --rows {args.rows} --clients {args.clients} --duration {args.duration:g} "
        f"--bare-rows {args.bare_rows}"
    )
    out.append(
        "stack   : inferq up with its defaults: embedded PostgreSQL and Redis; api, worker "
        f"(-c {Settings.model_fields['worker_concurrency'].default}), beat, flower; INFO logs; "
        f"rate limit on, the online load's own key at {LOAD_KEY_RATE:,.0f} requests/s; "
        + (f"ready {run.ready_s:.0f} s after start" if run.ready_s else "never ready")
        + (
            f"; removed from its environment: {', '.join(run.dropped_env)}"
            if run.dropped_env
            else ""
        )
    )
    if run.model:
        m = run.model
        schema = m.get("input_schema") or {}
        runtime = ", ".join(sorted(run.runtimes)) or "unknown (no 'loaded' line in worker.log)"
        out.append(
            f"model   : {MODEL} v{m.get('version')} ({m.get('stage')}, {m.get('format')}, "
            f"{m.get('artifact_bytes', 0) / 1024:,.0f} KiB, input {schema.get('input')}"
            f"): OneHotEncoder(plan, region) + HistGradientBoostingClassifier(max_iter=60) "
            f"fitted on accounts({TRAIN_ROWS}); trusted {m.get('trusted')}; workers run it on "
            f"{runtime}"
        )
    out += run.setup
    if run.check is not None:
        bad, diff = run.check
        out.append(
            f"check   : a {CHECK_ROWS}-row predict job against bare predict_proba: "
            + (
                "identical to the last bit"
                if not bad
                else f"WARNING {bad} scores differ, max {diff:g}"
            )
        )

    if run.online is not None:
        res = run.online
        rate = res.jobs / res.seconds if res.seconds else float("nan")
        out.append(f"== online: one-row predict jobs, {args.clients} clients, closed loop ==")
        out.append(
            f"  inferq: {rate:8.1f} jobs/s end to end, submit then result ({res.jobs} jobs in "
            f"{res.seconds:.1f} s after {WARMUP_S:g} s warm-up, {_errors(res)})"
        )
        out.append(_lat("submit", res.submit))
        out.append(_lat("completion", res.complete))
        out += _cpu_line(res.cpu, run.online_roots, res.jobs)
        out += run.ledger
        if run.feed is not None:
            f = run.feed
            reused = max(0, f.used - len(f.pool))
            out.append(
                f"  rows: {f.used:,} jobs submitted in all (warm-up included), "
                + (
                    f"each a different row of accounts(seed={ONLINE_SEED})"
                    if not reused
                    else f"{len(f.pool):,} different rows, {reused:,} sent a second time"
                )
            )
        if run.one_row is not None and run.one_call is not None:
            a, b = run.one_row, run.one_call
            out.append("  bare predict_proba on those rows, this process, one thread:")
            out.append(
                f"    (a) one row per call, a one-row DataFrame each: {_rate(a.rate):>9} rows/s "
                f"({a.rows:,} rows; per call p50 {ms(pct(a.latencies, 50))}, "
                f"p99 {ms(pct(a.latencies, 99))})"
            )
            if a.cpu is not None:
                out.append("        " + cpu_note(a.cpu))
            out.append(
                f"    (b) all {b.rows:,} rows in one call:          {_rate(b.rate):>9} rows/s "
                f"({b.seconds * 1000:.1f} ms)"
            )
            if run.runtime_row is not None:
                c = run.runtime_row
                out.append(
                    f"    (c) the workers' runtime ({run.runtime_name}), one JSON row per call: "
                    f"{_rate(c.rate):>9} rows/s (per call p50 {ms(pct(c.latencies, 50))}, "
                    f"p99 {ms(pct(c.latencies, 99))}; {c.rate / a.rate:.1f}x (a))"
                )
            out.append(
                f"  ratio inferq jobs/s : bare one-row-per-call rows/s = {rate:,.0f} : "
                f"{a.rate:,.0f} = {rate / a.rate:.2f}x (inferq on 2 cores, with HTTP, the "
                "ledger and the load generator; the bare loop on one thread)"
            )

    if run.score is not None:
        s, n = run.score, args.rows
        job = s.job
        result = job.get("result") or {}
        out.append(f"== score: one score job over {TABLE} ({n:,} rows) ==")
        if job.get("status") == "succeeded":
            ok = s.counted == (n, n) and result.get("rows_scored") == n
            chunks = max(1, -(-n // run.chunk_rows)) if run.chunk_rows else 0
            out.append(
                f"  inferq: {s.seconds:7.2f} s from POST to succeeded ({n / s.seconds:>11,.0f} "
                f"rows/s); the job's own duration_s {result.get('duration_s')}; {chunks} "
                f"chunk{'s' if chunks != 1 else ''} of up to {run.chunk_rows:,} ids for the "
                f"worker's pool processes"
            )
            out.append(
                f"    verified: rows_scored {result.get('rows_scored')}, {s.counted[0]:,} "
                f"predictions, {s.counted[1]:,} distinct account ids -> "
                f"{'OK' if ok else 'MISMATCH'}"
            )
        else:
            out.append(f"  inferq: FAILED, job {job.get('status')}: {job.get('error')}")
        if s.cpu is not None:
            out.append("    " + cpu_note(s.cpu))
        one, two = run.score_one, run.score_two
        if one is not None:
            out.append(
                f"  bare predict_proba on the same {n:,} rows read into a DataFrame, chunks of "
                f"{run.chunk_rows:,} (inferq's INFERQ_SCORE_CHUNK_ROWS), only the calls timed:"
            )
            out.append(
                f"    1 process, one thread:        {one.seconds:7.2f} s "
                f"({_rate(one.rate):>11} rows/s)"
            )
            if one.cpu is not None:
                out.append("      " + cpu_note(one.cpu))
            if run.runtime_score is not None:
                c = run.runtime_score
                out.append(
                    f"    the workers' runtime ({run.runtime_name}) on the same rows as codes, "
                    f"1 process, one thread: {c.seconds:.2f} s ({_rate(c.rate):>11} rows/s; "
                    f"{one.seconds / c.seconds:.2f}x bare)"
                )
        if two is not None:
            busy = " + ".join(f"{b:.2f}" for b in two.per_process)
            out.append(
                f"    2 processes, one thread each: {two.seconds:7.2f} s ({_rate(two.rate):>11} "
                f"rows/s; first start to last end, {busy} s in predict_proba by process)"
            )
            if two.cpu is not None:
                out.append("      " + cpu_note(two.cpu) + " (spawn and pickling included)")
        if two is not None and job.get("status") == "succeeded":
            out.append(
                f"  inferq score rows/s = {n / s.seconds / two.rate:.1%} of the 2-process bare "
                f"throughput ({n / s.seconds:,.0f} / {two.rate:,.0f})"
            )

    out.append("== stack ==")
    for note in run.stack_notes:
        out.append(f"  inferq up: {note}")
    notable = [line for line in run.stack_lines if _NOTABLE.search(line)]
    out.append(
        f"  inferq up printed {len(run.stack_lines)} lines besides 'inferq ready' (set-up INFO "
        f"logs included), {len(notable)} of them notices, warnings or errors:"
    )
    out += [f"    {line[:200]}" for line in notable[:10]]
    for name, scan in run.logs.items():
        c = scan["counts"]
        out.append(
            f"  {name}.log: {c['lines']} lines, {c['warning']} warnings, {c['error']} errors, "
            f"{c['critical']} critical, {c['tracebacks']} tracebacks"
        )
        for msg, k in sorted(scan["samples"].items(), key=lambda kv: -kv[1])[:5]:
            out.append(f"    x{k}: {msg}")
    out.append(f"  postgres log: {len(run.pg_problems)} WARNING/ERROR/FATAL/PANIC lines")
    out += [f"    {line[:200]}" for line in run.pg_problems[:5]]
    out.append("result: " + ("OK" if not run.failures else "FAILED: " + "; ".join(run.failures)))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.own_model_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the feature table")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds online")
    p.add_argument(
        "--bare-rows",
        type=int,
        default=2_000,
        help="rows of the bare one-row-per-call loop (the first rows sent online)",
    )
    p.add_argument("--keep", action="store_true", help="keep the data directory (logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env, dropped = stack_env()
    # This process and its bare predict processes: one thread each, set before numpy loads;
    # the stack gets the environment as it was.
    for var in THREAD_VARS:
        os.environ[var] = "1"
    from shared.devstack.embedded import free_port

    run = Run(args, dropped, machine=machine(), code=code_version())
    base = Path(tempfile.mkdtemp(prefix="inferq-own-"))
    try:
        say(f"starting inferq up under {base} ...")
        stack = Stack.start(base / "var", env, free_port(), free_port())
        try:
            measure(run, stack)
        except Exception as exc:  # reported, after the stack has stopped
            traceback.print_exc()
            run.failures.insert(0, f"{type(exc).__name__}: {exc}")
        finally:
            if stack.database_url:
                with contextlib.suppress(Exception):
                    close_db()
            run.stack_notes = stack.stop()
            for note in run.stack_notes:
                say(f"inferq up: {note}")
        collect_logs(run, stack)
        print(report(run), flush=True)
        return 1 if run.failures else 0
    except KeyboardInterrupt:
        say("interrupted: no report")
        return 130
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
