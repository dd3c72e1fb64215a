"""Population scoring benchmark: inferq's score job against its copy floor and the tutorial
batch-scoring loop, in one run, on the same table and model version.

    .venv/bin/python -m bench.score_bench --customers 1000000

Starts ``inferq up --customers N`` as a user does (its defaults, embedded PostgreSQL and
Redis in a temporary data directory; it seeds N synthetic customers and trains churn),
then, one after the other:

- floor: one binary ``COPY (SELECT id, <features as the workers read them>) TO STDOUT``
  of the whole table, then one binary ``COPY`` of as many prediction rows (the workers'
  encoding) into an index-less table shaped like ``predictions``: the database work a
  score run cannot avoid, with nothing else.
- inferq: one ``{"type": "score", "model": "churn"}`` job submitted over HTTP (a key of
  its own) and timed from the POST until the job reads ``succeeded``; its predictions are
  counted in Postgres; the peak resident memory (VmHWM) of the score worker's pool
  processes and of its parent is sampled from /proc during the run.
- tutorial: one process, ``LIMIT 10000 OFFSET k`` read with ``pandas.read_sql`` on a fresh
  connection per batch, categories mapped with ``Series.map``, the registered scikit-learn
  pipeline's ``predict_proba``, and a CSV ``copy_from`` into a partition of
  ``predictions``, committed per batch, until a batch comes back empty.

Prints inferq/floor (time) and inferq/tutorial (rows/s); see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PS = shutil.which("ps") or "ps"


# --- machine and /proc -------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown cpu"


def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A ``VmXXX`` field of /proc/<pid>/status in KiB, None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def children(pid: int) -> list[int]:
    out = subprocess.run([PS, "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def mb(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:,.0f} MB"


@dataclass
class MemorySampler:
    """Samples VmHWM of the worker parent and every pool process while a run is in flight:
    a pool process replaced mid-run (worker_max_memory_per_child) is still accounted for."""

    parent: int
    interval: float = 0.25
    peak: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for pid in [self.parent, *children(self.parent)]:
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                self.peak[pid] = max(hwm, self.peak.get(pid, 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


class CpuAccount:
    """CPU used on the machine during a phase by processes that are not this benchmark's.

    Ours are the live processes under ``roots`` (this process, hence the worker, the API
    and Redis; and the embedded postmaster), counted with the times of their reaped
    children (cutime/cstime), so short-lived Postgres backends stay ours. The rest of the
    machine's busy time (/proc/stat) is someone else's: a large figure means the timing
    was disturbed.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = [r for r in roots if r]
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy() -> int:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, parts[:8])
        return user + nice + system + irq + softirq + steal

    def _ours(self) -> int:
        procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks incl. reaped children)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            procs[int(entry.name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            kids.setdefault(ppid, []).append(pid)
        total, todo, seen = 0, [r for r in self.roots if r in procs], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += procs[pid][1]
            todo.extend(kids.get(pid, []))
        return total

    def __enter__(self) -> CpuAccount:
        self._start = (self._busy(), self._ours())
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, ours = self._busy() - self._start[0], self._ours() - self._start[1]
        self.wall = time.perf_counter() - self._t0
        self.ours_s = ours / self.tick
        self.foreign_s = max(0.0, (busy - ours) / self.tick)

    def describe(self) -> str:
        return (
            f"CPU during the phase: ours {self.ours_s:.1f} core-s, "
            f"other processes {self.foreign_s:.1f} core-s "
            f"(capacity {self.wall * (os.cpu_count() or 1):.1f} core-s)"
        )


# --- subprocesses ------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` s, reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def start_cli(name: str, base: Path, *args: str) -> Proc:
    log = base / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "shared.devstack.cli", *args],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def log_problems(path: Path) -> list[str]:
    """Lines of a (JSON-lines) log at WARNING or above, and tracebacks."""
    marks = ('"level": "WARNING"', '"level": "ERROR"', '"level": "CRITICAL"', "Traceback")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if any(m in line for m in marks)]


def run_timeline(path: Path, job_id: str) -> str:
    """Where a run's time went, from the workers' own log lines about it: the chunks'
    read, predict and write seconds (summed over the pool processes), and the index build
    and attach at the close."""
    read = predict = write = close = 0.0
    chunks = 0
    first = last = None
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no worker log"
    for line in lines:
        if job_id not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            message = entry.get("message", "")
            stamp = datetime.strptime(entry["ts"], "%Y-%m-%d %H:%M:%S,%f")
            first = first or stamp
            m = re.match(
                r"chunk \d+: \d+ rows, read ([\d.]+) s, predict ([\d.]+) s, "
                r"write(?:, index)? and commit ([\d.]+) s",
                message,
            )
            if m:
                chunks += 1
                read += float(m[1])
                predict += float(m[2])
                write += float(m[3])
                last = stamp
            m = re.search(r"(?:indexed and )?attached in ([\d.]+) s", message)
            if m:
                close = float(m[1])
    span = f"{(last - first).total_seconds():.2f} s" if first and last else "?"
    return (
        f"timeline: {chunks} chunks in {span} of wall time (first log line to last chunk), "
        f"summed over processes read {read:.2f} s, predict {predict:.2f} s, write, index "
        f"and commit {write:.2f} s; attach at the close {close:.2f} s"
    )


# --- the two engines ---------------------------------------------------------------------


def wait_quiet(timeout: float) -> float:
    """Seconds waited until no job is queued or running."""
    from sqlalchemy import text

    from shared.db import session_scope

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with session_scope() as session:
            busy = session.execute(
                text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            ).scalar_one()
        if not busy:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"jobs still queued or running after {timeout:.0f} s")


def count_predictions(run_id: str) -> tuple[int, int]:
    from sqlalchemy import text

    from shared.db import session_scope

    with session_scope() as session:
        total, distinct = session.execute(
            text("SELECT count(*), count(DISTINCT entity_id) FROM predictions WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    return int(total), int(distinct)


@dataclass
class InferqResult:
    seconds: float = 0.0
    status: str = "not run"
    job: dict[str, Any] = field(default_factory=dict)
    counted: tuple[int, int] = (0, 0)
    idle_child_kb: int | None = None
    child_kb: int | None = None  # max VmHWM of the pool processes alive at the end
    parent_kb: int | None = None
    parent_pid: int = 0
    children_end: list[int] = field(default_factory=list)
    sampled: dict[int, int] = field(default_factory=dict)
    worker_problems: list[str] = field(default_factory=list)
    api_problems: list[str] = field(default_factory=list)
    cpu: CpuAccount | None = None
    timeline: str = ""


def run_inferq(stack: Any, n: int, timeout: float, roots: list[int]) -> InferqResult:
    """One score job over HTTP on ``inferq up``, timed from the POST to ``succeeded``."""
    import httpx

    res = InferqResult()
    worker = stack.roots()["worker score,ops"]  # the pool score runs go to
    res.parent_pid = worker
    key = stack.load_key()
    try:
        with httpx.Client(
            base_url=stack.api, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            idle = [proc_status_kb(p, "VmHWM") for p in children(worker)]
            res.idle_child_kb = max((v for v in idle if v is not None), default=None)
            cpu = CpuAccount(roots)
            with MemorySampler(worker) as sampler, cpu:
                start = time.perf_counter()
                r = client.post("/v1/jobs", json={"type": "score", "model": "churn"})
                if r.status_code >= 400:
                    raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text}")
                job = r.json()
                end_by = time.monotonic() + timeout
                while job["status"] in ("queued", "running"):
                    if time.monotonic() > end_by:
                        break
                    if stack.popen.poll() is not None:
                        raise RuntimeError("inferq up exited during the run")
                    job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
                res.seconds = time.perf_counter() - start
            res.job = job
            res.status = job["status"] if job["status"] not in ("queued", "running") else "timeout"
            res.sampled = sampler.peak
            res.cpu = cpu
        res.children_end = children(worker)
        ends = [proc_status_kb(p, "VmHWM") for p in res.children_end]
        res.child_kb = max((v for v in ends if v is not None), default=None)
        res.parent_kb = proc_status_kb(worker, "VmHWM")
        res.counted = count_predictions(res.job["id"])
        return res
    finally:
        logs = stack.data_dir / "logs"
        res.worker_problems = log_problems(logs / "worker-jobs.log")
        if res.job:
            res.timeline = run_timeline(logs / "worker-jobs.log", res.job["id"])
        res.api_problems = log_problems(logs / "api.log")


@dataclass
class FloorResult:
    copy_out_s: float = 0.0
    copy_in_s: float = 0.0
    rows: int = 0
    out_bytes: int = 0

    @property
    def seconds(self) -> float:
        return self.copy_out_s + self.copy_in_s


def run_floor(version: int) -> FloorResult:
    """The copy floor on the same table: one binary COPY out of the feature columns as the
    workers read them, then one binary COPY of as many prediction rows (the workers'
    encoding) into an index-less table shaped like ``predictions``; nothing else."""
    import numpy as np

    from shared.db import get_engine, session_scope
    from shared.models.registry import ModelCache
    from shared.scoring import pgcopy
    from shared.scoring.chunk import _select_features
    from shared.scoring.partitions import chunk_table_name, chunk_table_statements

    with session_scope() as session:
        schema = ModelCache().get(session, "churn", version).schema
    res = FloorResult()
    raw = get_engine().raw_connection()
    try:
        cur = raw.cursor()
        sink = io.BytesIO()  # as a chunk reads
        t0 = time.perf_counter()
        cur.copy_expert(
            f"COPY (SELECT id::int8, {_select_features(schema)} FROM customers) "
            "TO STDOUT (FORMAT binary)",
            sink,
        )
        res.copy_out_s = time.perf_counter() - t0
        data = sink.getvalue()
        res.out_bytes = len(data)
        ids, _ = pgcopy.read_float_rows(data, len(schema["features"]))
        del data, sink
        res.rows = len(ids)
        scores = np.random.default_rng(0).random(len(ids))
        # The workers' own encoding: a chunk's table has the run's constants as its
        # column defaults, and the COPY carries the rest.
        run_id, scored_at = uuid.uuid4(), datetime.now(UTC)
        stream = pgcopy.prediction_records(
            run_id=run_id.bytes,
            entity_ids=ids,
            model="churn",
            version=version,
            scores=scores,
            labels=scores >= 0.5,
            scored_at=scored_at,
            constants=False,
        )
        floor = chunk_table_name(run_id, 0)  # a chunk's table, as the workers create it
        ddl = chunk_table_statements(
            run_id,
            0,
            int(ids.min()),
            int(ids.max()),
            started_at=scored_at,
            model="churn",
            version=version,
        )
        cur.execute(";\n".join(ddl))
        raw.commit()
        t0 = time.perf_counter()
        cur.copy_expert(
            f'COPY "{floor}" ({pgcopy.OWN_COLUMNS}) FROM STDIN (FORMAT binary)',
            io.BytesIO(stream),
        )
        raw.commit()
        res.copy_in_s = time.perf_counter() - t0
        cur.execute(f'DROP TABLE "{floor}"')
        raw.commit()
    finally:
        raw.close()
    return res


@dataclass
class TutorialResult:
    seconds: float = 0.0
    rows: int = 0
    counted: tuple[int, int] = (0, 0)
    batches: int = 0
    capped: bool = False
    cpu: CpuAccount | None = None


def run_tutorial(
    version: int, batch: int, max_rows: int | None, roots: list[int]
) -> TutorialResult:
    """The loop of the batch-scoring tutorials, in this process."""
    import numpy as np
    import pandas as pd
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from shared.config import get_settings
    from shared.db import session_scope
    from shared.models.catalog import CHURN_SCHEMA
    from shared.models.registry import ModelCache

    with session_scope() as session:
        pipeline = ModelCache().get(session, "churn", version).estimator  # scikit-learn
    features = CHURN_SCHEMA["features"]
    engine = create_engine(get_settings().database_url, poolclass=NullPool)
    run_id = str(uuid.uuid4())
    # Its rows go where a run's go: a partition of predictions of their own (set-up, not
    # timed; a tutorial writing into a plain table would get the same).
    from shared.scoring.partitions import ensure_partition

    with engine.begin() as conn:
        ensure_partition(conn, uuid.UUID(run_id))
    res = TutorialResult(cpu=CpuAccount(roots))
    res.cpu.__enter__()
    start = time.perf_counter()
    k = 0
    while max_rows is None or k < max_rows:
        limit = batch if max_rows is None else min(batch, max_rows - k)
        with engine.connect() as conn:  # a fresh connection for every batch
            df = pd.read_sql(f"SELECT * FROM customers ORDER BY id LIMIT {limit} OFFSET {k}", conn)
            if df.empty:
                break
            X = pd.DataFrame(index=df.index)
            for f in features:  # schema order; categories to their index in the schema
                if f["type"] == "str":
                    X[f["name"]] = df[f["name"]].map({c: i for i, c in enumerate(f["categories"])})
                else:
                    X[f["name"]] = df[f["name"]]
            proba = pipeline.predict_proba(X.values.astype(np.float64))[:, 1]
            out = pd.DataFrame(
                {
                    "run_id": run_id,
                    "entity_id": df["id"],
                    "model": "churn",
                    "version": version,
                    "score": proba,
                    "label": proba >= 0.5,
                    "scored_at": datetime.now(UTC).isoformat(),
                }
            )
            buf = io.StringIO()
            out.to_csv(buf, index=False, header=False)
            buf.seek(0)
            cur = conn.connection.cursor()  # the psycopg2 connection under it
            cur.copy_from(buf, "predictions", sep=",", columns=list(out.columns))
            conn.commit()
        res.rows += len(df)
        res.batches += 1
        k += batch
    res.seconds = time.perf_counter() - start
    res.cpu.__exit__()
    engine.dispose()
    res.capped = max_rows is not None and res.rows >= max_rows
    res.counted = count_predictions(run_id)
    return res


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.score_bench",
        description="Time a population score job of inferq against its copy floor and the "
        "tutorial loop, in one run.",
    )
    p.add_argument("--customers", type=int, default=1_000_000, help="rows to seed and score")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="INFERQ_SCORE_CHUNK_ROWS for the stack (default: inferq's own default)",
    )
    p.add_argument("--tutorial-batch", type=int, default=10_000, help="LIMIT of the tutorial")
    p.add_argument(
        "--tutorial-max-rows",
        type=int,
        default=None,
        help="stop the tutorial after this many rows and take its rate on those "
        "(OFFSET paging is quadratic in the table size)",
    )
    p.add_argument("--skip-tutorial", action="store_true", help="no tutorial loop")
    p.add_argument(
        "--timeout", type=float, default=3600, help="give up on the score job after this many s"
    )
    return p.parse_args()


def main() -> int:  # noqa: C901 (one linear script)
    args = parse_args()
    base = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    stack: Any = None
    failed = False
    try:
        from bench.load_bench import code_version, machine
        from bench.own_model_bench import Stack, stack_env
        from shared.devstack.embedded import free_port

        header = machine()  # before the stack starts: the load average of a quiet machine
        n = args.customers
        env, _ = stack_env()
        if args.chunk_rows:
            env["INFERQ_SCORE_CHUNK_ROWS"] = str(args.chunk_rows)
        t0 = time.perf_counter()
        print(f"# inferq up --customers {n} (seeds and trains churn) ...", file=sys.stderr)
        stack = Stack.start(
            base / "var", env, free_port(), free_port(), extra=("--customers", str(n))
        )
        stack.wait_ready(args.timeout)
        seed_s = time.perf_counter() - t0
        # This process reads the stack's database (the floor, the tutorial, the counts).
        os.environ["INFERQ_DATABASE_URL"] = stack.database_url
        os.environ["INFERQ_REDIS_URL"] = stack.redis_url

        from shared.config import get_settings
        from shared.db import get_engine, session_scope
        from shared.models.registry import ModelCache, production_versions

        with session_scope() as session:
            version = production_versions(session)["churn"]
            runtime = ModelCache().get(session, "churn", version).runtime
        chunk_rows = int(args.chunk_rows or get_settings().score_chunk_rows)
        postmaster = stack.postmaster()
        roots = [os.getpid(), stack.pid] + ([postmaster] if postmaster else [])
        # The stack's start-up work settles first: beat catches up today's nightly run over
        # the same table (inferq up's default), models load.
        waited = wait_quiet(args.timeout)
        if waited:
            print(f"# waited {waited:.1f} s for the stack's own jobs to end", file=sys.stderr)
        time.sleep(3)

        print("# floor: COPY out, COPY in ...", file=sys.stderr)
        floor = run_floor(version)
        get_engine().dispose()
        print("# inferq: score job ...", file=sys.stderr)
        inferq: InferqResult | None = None
        inferq_error = ""
        try:
            inferq = run_inferq(stack, n, args.timeout, roots)
        except Exception as exc:  # report, still run the tutorial
            inferq_error = f"{type(exc).__name__}: {exc}"

        tutorial: TutorialResult | None = None
        if not args.skip_tutorial:
            print("# tutorial: LIMIT/OFFSET loop ...", file=sys.stderr)
            tutorial = run_tutorial(version, args.tutorial_batch, args.tutorial_max_rows, roots)

        # --- the figures ---------------------------------------------------------------
        print()
        print(header)
        print(code_version())
        print(
            f"stack   : inferq up --customers {n:,} (defaults); ready after {seed_s:.1f} s, "
            "seeding and training included (not part of the benchmark)"
        )
        print(
            f"model   : churn v{version}; inferq workers run it on {runtime}, "
            f"the tutorial on scikit-learn predict_proba"
        )
        print(
            f"floor   : {floor.seconds:7.2f} s  = COPY out {floor.copy_out_s:.2f} s "
            f"({floor.rows:,} rows, {floor.out_bytes / 1e6:,.0f} MB) + COPY in "
            f"{floor.copy_in_s:.2f} s (as many prediction rows, index-less table)"
        )
        if inferq is None or inferq.status != "succeeded":
            failed = True
            what = inferq_error or (
                f"job {inferq.job.get('id')} ended {inferq.status}: {inferq.job.get('error')}"
                if inferq
                else "not run"
            )
            print(f"inferq  : FAILED ({what})")
        else:
            ok = inferq.counted == (n, n) and inferq.job.get("result", {}).get("rows_scored") == n
            failed |= not ok
            pool = {p: v for p, v in inferq.sampled.items() if p != inferq.parent_pid}
            gone = sorted(set(pool) - set(inferq.children_end))
            print(
                f"inferq  : {inferq.seconds:7.2f} s  ({n / inferq.seconds:>11,.0f} rows/s)  "
                f"worker peak RSS per process: {mb(inferq.child_kb)} "
                f"(parent {mb(inferq.parent_kb)})"
            )
            print(
                f"          {len(inferq.children_end)} pool processes (score,ops worker), "
                f"{chunk_rows:,}-row chunks; pool process idle before the job "
                f"{mb(inferq.idle_child_kb)}; {len(pool)} pool processes seen during the run"
                + (f" ({len(gone)} replaced mid-run)" if gone else "")
                + f", max VmHWM of any {mb(max(pool.values(), default=None))}"
            )
            print(
                f"          verified: {inferq.counted[0]:,} predictions, "
                f"{inferq.counted[1]:,} distinct customers -> {'OK' if ok else 'MISMATCH'}"
            )
            if inferq.cpu is not None:
                print("          " + cpu_note(inferq.cpu))
            print("          " + inferq.timeline)
            print(
                f"inferq / floor: {inferq.seconds / floor.seconds:.2f}x the floor's time "
                "(target <= 1.5x)"
            )
        if inferq is not None:
            print(
                f"          worker log: {len(inferq.worker_problems)} warning/error lines; "
                f"API log: {len(inferq.api_problems)}"
            )
            for line in (inferq.worker_problems + inferq.api_problems)[:5]:
                print("            " + line[:300])
        if tutorial is not None:
            expect = min(n, args.tutorial_max_rows) if args.tutorial_max_rows else n
            ok = tutorial.counted == (expect, expect) and tutorial.rows == expect
            failed |= not ok
            print(
                f"tutorial: {tutorial.seconds:7.2f} s  ({tutorial.rows / tutorial.seconds:>11,.0f}"
                f" rows/s)  {tutorial.batches} batches of {args.tutorial_batch:,}"
                + (
                    f"; CAPPED at the first {tutorial.rows:,} of {n:,} rows "
                    "(--tutorial-max-rows), rate on those rows"
                    if tutorial.capped and tutorial.rows < n
                    else ""
                )
            )
            print(
                f"          verified: {tutorial.counted[0]:,} predictions, "
                f"{tutorial.counted[1]:,} distinct customers -> {'OK' if ok else 'MISMATCH'}"
            )
            if tutorial.cpu is not None:
                print("          " + cpu_note(tutorial.cpu))
            if inferq is not None and inferq.status == "succeeded":
                speedup = (n / inferq.seconds) / (tutorial.rows / tutorial.seconds)
                print(f"speed-up: {speedup:.1f}x  (rows/s inferq / rows/s tutorial; target >= 8x)")
        if inferq is not None and inferq.status != "succeeded" or inferq_error:
            print("\nworker log tail:", file=sys.stderr)
            with contextlib.suppress(OSError):
                lines = (stack.data_dir / "logs" / "worker-jobs.log").read_text(errors="replace")
                print("\n".join(lines.splitlines()[-30:]), file=sys.stderr)
    finally:
        if stack is not None:
            for note in stack.stop():
                print(f"# inferq up: {note}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


def cpu_note(cpu: CpuAccount) -> str:
    note = cpu.describe()
    share = cpu.foreign_s / max(cpu.wall * (os.cpu_count() or 1), 1e-9)
    if share > 0.10:
        note += f"  WARNING: {share:.0%} of the machine was busy elsewhere; timing disturbed"
    return note


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
