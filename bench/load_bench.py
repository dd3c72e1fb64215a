"""Online predict jobs over HTTP: inferq against the naive design and a floor, in one run.

    python -m bench.load_bench [--duration 10] [--concurrency 64] [--rate R] [--config default]

**--config default** (what users run): ``inferq up`` on its defaults in a temporary data
directory (embedded PostgreSQL and Redis, the api, a predict worker, a score+ops worker,
beat, Flower, INFO logs, the rate limit on); the load uses a key of its own whose rate
(100,000 requests/s) admits it, so every request still goes through the limiter.
**--config stripped**: the earlier, stripped stack (embedded servers, ``inferq api`` and
``inferq worker -Q predict -c 2`` only, logs at WARNING, rate limit and prediction cache
off, 20,000 customers), to see what the defaults cost.

Then, one after the other on the same servers (the stack idle meanwhile):

* **inferq**: clients POST /v1/jobs and long-poll GET /v1/jobs/{id}?wait=10.
* **floor**: ``bench.floor_app`` on the same uvicorn, a trivial ASGI app answering the
  POST with a 202 and the GET with a stored body: the HTTP ceiling of this machine for
  this load generator.
* **naive**: ``bench.naive_app`` (FastAPI, ``.delay()`` per request, state from Celery's
  Redis result backend) and ``bench.naive_tasks`` (``celery worker -c 2``, one task and one
  pandas DataFrame per row); clients poll GET /jobs/{id} every 5 ms.

Each system gets the same load from an aiohttp client in this process (one event loop,
one connection pool of ``--concurrency`` connections), every request a different random
valid churn row:

a. closed loop: ``--concurrency`` clients, each submit then wait for the result, for
   ``--duration`` s after a 2 s warm-up;
b. open loop: ``--rate`` jobs/s (default: half of inferq's closed-loop jobs/s, the same
   for every system) offered at fixed intervals, each job waited for by its own task;
c. idle: 200 jobs one at a time;
d. cold: 60 jobs, each after 0.3 s of quiet;
e. asleep: 20 jobs, each after 1 s of quiet.

Reported: jobs/s, submit latency (POST round trip), completion latency (POST start to
result seen), the CPU used by this driver (share of all cores), by each process tree and
by the servers, what the logs said, and the ratios inferq/naive and inferq/floor.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import gc
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
CUSTOMERS = 20_000
WARMUP_S = 2.0
IDLE_JOBS = 200
#: Cold jobs: each after 0.3 s of quiet (the issue's definition). That is shorter than
#: inferq's default INFERQ_PREDICT_IDLE_S (0.5 s): most are taken by a drain still
#: waiting, the others by the fresh delivery a drain hands over to once a second.
COLD_JOBS = 60
COLD_GAP_S = 0.3
#: Asleep: each after a quiet spell longer than INFERQ_PREDICT_IDLE_S, so on inferq each
#: one rings the doorbell and goes through a Celery delivery, as on a system at rest.
ASLEEP_JOBS = 20
ASLEEP_GAP_S = 1.0
NAIVE_POLL_S = 0.005
INFERQ_WAIT_S = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# --- rows ------------------------------------------------------------------------------

_rng = random.Random(20240601)


def random_row(rng: random.Random | None = None) -> dict[str, Any]:
    """A valid churn row (the demo model's input schema), different every call; drawn
    from ``rng``, by default this benchmark's own seeded one."""
    r = _rng if rng is None else rng
    return {
        "tenure_months": r.randint(1, 120),
        "monthly_spend": round(r.uniform(5.0, 2_000.0), 2),
        "support_tickets": r.randint(0, 20),
        "feature_usage_pct": round(r.random(), 4),
        "last_login_days_ago": r.randint(0, 365),
        "num_integrations": r.randint(0, 30),
        "contract_type": r.choice(("monthly", "annual", "multi-year")),
        "plan_tier": r.choice(("starter", "growth", "enterprise")),
        "is_enterprise": r.randint(0, 1),
    }


# --- CPU accounting --------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime seconds) for every process we can read."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def _tree_cpu(table: dict[int, tuple[int, float]], root: int) -> dict[int, float]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    out: dict[int, float] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            out[pid] = table[pid][1]
            stack.extend(children.get(pid, ()))
    return out


def _system_busy() -> tuple[float, float, float]:
    """(busy, total, stolen) seconds of all CPUs, from /proc/stat. Stolen: time a virtual
    machine's CPUs were runnable but the hypervisor ran something else (counted in busy)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    steal = vals[7] if len(vals) > 7 else 0
    return (total - idle) / CLK_TCK, total / CLK_TCK, steal / CLK_TCK


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class CpuSnap:
    wall: float
    epoch: float
    driver: float
    trees: dict[str, dict[int, float]]
    roots: dict[str, int]
    busy: float
    total: float
    stolen: float


class CpuMeter:
    """CPU seconds of this process, of named process trees and of the whole machine."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots

    def snap(self) -> CpuSnap:
        table = _proc_table()
        busy, total, stolen = _system_busy()
        return CpuSnap(
            time.perf_counter(),
            time.time(),
            _self_cpu(),
            {name: _tree_cpu(table, pid) for name, pid in self.roots.items()},
            dict(self.roots),
            busy,
            total,
            stolen,
        )

    @staticmethod
    def delta(a: CpuSnap, b: CpuSnap) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall": b.wall - a.wall,
            "driver": b.driver - a.driver,
            "from": a.epoch,
            "to": b.epoch,
        }
        for name, after in b.trees.items():
            before = a.trees.get(name, {})
            # A process born during the phase counts from zero; one that died is lost.
            per = {pid: v - before.get(pid, 0.0) for pid, v in after.items()}
            out[name] = sum(per.values())
            # Root first, then its descendants by pid.
            out[name + "/procs"] = [
                per[pid] for pid in sorted(per, key=lambda p: (p != a.roots[name], p))
            ]
        out["machine_busy"] = b.busy - a.busy
        out["stolen"] = b.stolen - a.stolen
        return out


# --- statistics ------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def ms(v: float) -> str:
    return "n/a" if v != v else f"{v * 1000:.1f} ms"


# --- the two systems as clients --------------------------------------------------------


class JobFailedError(Exception):
    pass


class HttpStatusError(Exception):
    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what} -> HTTP {status}: {body[:200]}")
        self.status = status
        self.what = what


@dataclass
class Target:
    name: str
    base: str
    submit: Callable[[Any, dict[str, Any]], Awaitable[str]]
    wait: Callable[[Any, str], Awaitable[Any]]
    roots: dict[str, int] = field(default_factory=dict)
    description: str = ""
    extra: list[str] = field(default_factory=list)
    score: Callable[[Any], float] = float
    check: float | None = None


def inferq_target(base: str, api_key: str) -> Target:
    headers = {"Authorization": f"Bearer {api_key}"}

    async def submit(session: Any, row: dict[str, Any]) -> str:
        async with session.post(
            f"{base}/v1/jobs", json={"model": "churn", "inputs": [row]}, headers=headers
        ) as resp:
            if resp.status != 202:
                raise HttpStatusError("POST /v1/jobs", resp.status, await resp.text())
            return str((await resp.json())["id"])

    async def wait(session: Any, job_id: str) -> Any:
        while True:
            async with session.get(
                f"{base}/v1/jobs/{job_id}", params={"wait": str(INFERQ_WAIT_S)}, headers=headers
            ) as resp:
                if resp.status != 200:
                    raise HttpStatusError("GET /v1/jobs/{id}", resp.status, await resp.text())
                job = await resp.json()
            status = job["status"]
            if status == "succeeded":
                return job["result"]
            if status in ("failed", "cancelled"):
                raise JobFailedError(f"job {status}: {job.get('error')}")

    return Target("inferq", base, submit, wait, score=lambda r: r["predictions"][0]["score"])


def naive_target(base: str) -> Target:
    async def submit(session: Any, row: dict[str, Any]) -> str:
        async with session.post(f"{base}/jobs", json=row) as resp:
            if resp.status != 202:
                raise HttpStatusError("POST /jobs", resp.status, await resp.text())
            return str((await resp.json())["id"])

    async def wait(session: Any, job_id: str) -> Any:
        while True:
            async with session.get(f"{base}/jobs/{job_id}") as resp:
                if resp.status != 200:
                    raise HttpStatusError("GET /jobs/{id}", resp.status, await resp.text())
                doc = await resp.json()
            if doc["state"] == "SUCCESS":
                return doc["result"]
            if doc["state"] in ("FAILURE", "REVOKED"):
                raise JobFailedError(f"task {doc['state']}: {doc.get('error')}")
            await asyncio.sleep(NAIVE_POLL_S)

    return Target("naive", base, submit, wait)


def _error_key(exc: BaseException) -> str:
    if isinstance(exc, HttpStatusError):
        return f"{exc.what} HTTP {exc.status}"
    if isinstance(exc, JobFailedError):
        return str(exc)[:120]
    return f"{type(exc).__name__}: {str(exc)[:100]}"


# --- load phases -----------------------------------------------------------------------


#: Seconds the current task's requests spent queued for a pooled connection, when set.
_pool_wait: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "pool_wait", default=None
)


def _session(concurrency: int) -> Any:
    import aiohttp

    async def queued(_: Any, ctx: Any, __: Any) -> None:
        ctx.queued_at = time.perf_counter()

    async def dequeued(_: Any, ctx: Any, __: Any) -> None:
        acc = _pool_wait.get()
        if acc is not None:
            acc[0] += time.perf_counter() - ctx.queued_at

    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(queued)
    trace.on_connection_queued_end.append(dequeued)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=60),
        trace_configs=[trace],
    )


@dataclass
class PhaseResult:
    name: str
    jobs: int = 0
    seconds: float = 0.0
    submit: list[float] = field(default_factory=list)
    complete: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    pool: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    cpu: dict[str, float] = field(default_factory=dict)
    offered: float = 0.0
    submitted: int = 0
    accepted: int = 0


async def warm(target: Target, concurrency: int) -> None:
    """Load models in every worker process and open connections; not measured."""
    async with _session(concurrency) as session:
        # The valid row of the docs and the test suite: both systems must score it alike.
        from shared.models.catalog import CHURN_EXAMPLE_ROW

        row = dict(CHURN_EXAMPLE_ROW)
        result = await target.wait(session, await target.submit(session, row))
        target.check = float(target.score(result))
        for _ in range(10):
            await target.wait(session, await target.submit(session, random_row()))

        async def one() -> None:
            await target.wait(session, await target.submit(session, random_row()))

        await asyncio.gather(*(one() for _ in range(2 * concurrency)))


async def closed_loop(
    target: Target, meter: CpuMeter, concurrency: int, duration: float
) -> PhaseResult:
    res = PhaseResult("closed")
    stop = asyncio.Event()
    done: list[tuple[float, float, float]] = []
    failed: list[tuple[float, str]] = []

    async with _session(concurrency) as session:

        async def client() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    job_id = await target.submit(session, random_row())
                    t1 = time.perf_counter()
                    await target.wait(session, job_id)
                    done.append((t0, t1, time.perf_counter()))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failed.append((time.perf_counter(), _error_key(exc)))
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(WARMUP_S)
        a = meter.snap()
        await asyncio.sleep(duration)
        b = meter.snap()
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    lo, hi = a.wall, b.wall
    window = [d for d in done if lo <= d[2] < hi]
    res.jobs = len(window)
    res.seconds = hi - lo
    res.submit = [t1 - t0 for t0, t1, _ in window]
    res.complete = [t2 - t0 for t0, _, t2 in window]
    res.errors.update(k for t, k in failed if lo <= t < hi)
    res.cpu = CpuMeter.delta(a, b)
    return res


async def open_loop(
    target: Target, meter: CpuMeter, concurrency: int, rate: float, duration: float
) -> PhaseResult:
    res = PhaseResult("open", offered=rate)
    records: list[tuple[float, float, float | None, float | None, str | None, float]] = []

    # Submits get a pool of their own: with one pool, waits for results that lag behind
    # would hold every connection and POSTs would queue in the client, not the server.
    async with _session(concurrency) as session, _session(concurrency) as waits:

        async def one(scheduled: float) -> None:
            t0 = time.perf_counter()
            t1 = t2 = None
            err = None
            pool = [0.0]
            _pool_wait.set(pool)
            try:
                job_id = await target.submit(session, random_row())
                t1 = time.perf_counter()
                _pool_wait.set(None)
                await target.wait(waits, job_id)
                t2 = time.perf_counter()
            except asyncio.CancelledError:
                err = "not finished 60 s after the last submit"
                raise
            except Exception as exc:  # noqa: BLE001
                err = _error_key(exc)
            finally:
                records.append((scheduled, t0, t1, t2, err, pool[0]))

        total = int(rate * (WARMUP_S + duration))
        start = time.perf_counter() + 0.05
        measure_from = start + WARMUP_S
        measure_to = measure_from + duration
        a = None
        tasks: list[asyncio.Task[None]] = []
        i = 0
        while i < total:
            now = time.perf_counter()
            if a is None and now >= measure_from:
                a = meter.snap()
            while i < total and start + i / rate <= now:
                tasks.append(asyncio.create_task(one(start + i / rate)))
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        # The schedule is over once the last interval has passed.
        await asyncio.sleep(max(0.0, measure_to - time.perf_counter()))
        b = meter.snap()
        _, pending = await asyncio.wait(tasks, timeout=60) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    assert a is not None
    lo, hi = measure_from, measure_to
    mine = [r for r in records if lo <= r[0] < hi]
    res.seconds = b.wall - a.wall
    res.submitted = sum(1 for r in mine if r[2] is not None)
    res.accepted = sum(1 for r in records if r[2] is not None and a.wall <= r[2] < b.wall)
    res.jobs = sum(1 for r in records if r[3] is not None and a.wall <= r[3] < b.wall)
    res.submit = [r[2] - r[1] for r in mine if r[2] is not None]
    res.complete = [r[3] - r[1] for r in mine if r[3] is not None]
    res.lag = [r[1] - r[0] for r in mine]
    res.pool = [r[5] for r in mine if r[2] is not None]
    res.errors.update(r[4] for r in mine if r[4] is not None)
    res.cpu = CpuMeter.delta(a, b)
    return res


async def idle(
    target: Target, meter: CpuMeter, *, jobs: int, gap: float = 0.0, name: str = "idle"
) -> PhaseResult:
    """Jobs one at a time; with ``gap``, each after that many seconds of quiet."""
    res = PhaseResult(name)
    async with _session(1) as session:
        a = meter.snap()
        for _ in range(jobs):
            if gap:
                await asyncio.sleep(gap)
            t0 = time.perf_counter()
            try:
                job_id = await target.submit(session, random_row())
                t1 = time.perf_counter()
                await target.wait(session, job_id)
                t2 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001
                res.errors[_error_key(exc)] += 1
                continue
            res.submit.append(t1 - t0)
            res.complete.append(t2 - t0)
        b = meter.snap()
    res.jobs = len(res.complete)
    res.seconds = b.wall - a.wall
    res.cpu = CpuMeter.delta(a, b)
    return res


@contextlib.contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """The load generator's cyclic garbage collector off while a system is measured: a
    full collection of this process's heap took 93 ms on the development machine, and a
    pause of the driver's one event loop is added to the latency of every request in
    flight, whatever the server under test."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def measure(
    target: Target, concurrency: int, rate: float | None, duration: float
) -> list[PhaseResult]:
    """Closed loop, open loop at ``rate`` (None: half of this closed loop's jobs/s), idle,
    cold and asleep phases, in that order, with the driver's garbage collector paused."""
    with _no_gc_pauses():
        return await _phases(target, concurrency, rate, duration)


async def _phases(
    target: Target, concurrency: int, rate: float | None, duration: float
) -> list[PhaseResult]:
    meter = CpuMeter(target.roots)

    def say(what: str) -> None:
        print(f"  {target.name}: {what} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)

    say("warming up")
    await warm(target, concurrency)
    say("closed loop")
    out = [await closed_loop(target, meter, concurrency, duration)]
    if rate is None:
        rate = round(out[0].jobs / out[0].seconds / 2)
    await asyncio.sleep(1)
    say(f"open loop at {rate:g} jobs/s")
    out.append(await open_loop(target, meter, concurrency, rate, duration))
    await asyncio.sleep(1)
    say("idle")
    out.append(await idle(target, meter, jobs=IDLE_JOBS))
    await asyncio.sleep(COLD_GAP_S)
    say("cold")
    out.append(await idle(target, meter, jobs=COLD_JOBS, gap=COLD_GAP_S, name="cold"))
    await asyncio.sleep(ASLEEP_GAP_S)
    say("asleep")
    out.append(await idle(target, meter, jobs=ASLEEP_JOBS, gap=ASLEEP_GAP_S, name="asleep"))
    return out


# --- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group we created for it, SIGKILL what is left, reap."""
        pgid = self.popen.pid
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.popen.wait()


def start(name: str, args: list[str], env: dict[str, str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def wait_http(url: str, procs: Iterable[Proc], timeout: float, headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
        try:
            r = httpx.get(url, timeout=5, headers=headers)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {url}: {last}")


_LEVEL = re.compile(r'"level":\s*"(\w+)"|\b(WARNING|ERROR|CRITICAL)\b')


def scan_log(path: Path) -> dict[str, Any]:
    """Counts of warnings, errors and tracebacks in a log, and the first distinct messages."""
    counts: collections.Counter = collections.Counter()
    samples: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        counts["lines"] += 1
        if "Traceback" in line:
            counts["tracebacks"] += 1
        level = None
        if line.startswith("{"):
            try:
                doc = json.loads(line)
                level = str(doc.get("level", "")).upper()
                msg = str(doc.get("message", ""))
                if doc.get("exc_info"):
                    counts["tracebacks"] += 1
                    msg += " | " + str(doc["exc_info"]).strip().splitlines()[-1]
            except ValueError:
                msg = line
        else:
            m = _LEVEL.search(line)
            level = (m.group(1) or m.group(2)).upper() if m else None
            msg = line
        if level in ("WARNING", "ERROR", "CRITICAL"):
            counts[level.lower()] += 1
            key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+", "#", msg)[:160]
            samples[key] = samples.get(key, 0) + 1
    return {"counts": counts, "samples": samples}


_LEDGER_SQL = """
WITH w AS (
    SELECT * FROM jobs
    WHERE type = 'predict' AND created_at >= to_timestamp(:lo) AND created_at < to_timestamp(:hi)
), m AS (SELECT worker, count(*) AS n FROM w WHERE worker IS NOT NULL GROUP BY worker
), b AS (  -- a batch: the jobs one claim statement took (one delivery, one now())
    SELECT count(*) AS n FROM w WHERE worker IS NOT NULL GROUP BY worker, started_at
)
SELECT
    (SELECT count(*) FROM w),
    (SELECT count(*) FROM w WHERE status <> 'succeeded'),
    (SELECT count(*) FROM w WHERE attempts > 1),
    (SELECT count(*) FROM m),
    (SELECT count(*) FROM b),
    (SELECT avg(n) FROM b),
    (SELECT max(n) FROM b),
    (SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
        ORDER BY extract(epoch FROM started_at - created_at)) FROM w),
    (SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
        ORDER BY extract(epoch FROM finished_at - started_at)) FROM w)
"""


def ledger_breakdown(phases: list[PhaseResult]) -> list[str]:
    """What inferq's own ledger says about the measured jobs: batching and where time went."""
    from sqlalchemy import text

    from shared.db import get_engine

    lines = []
    with get_engine().connect() as conn:
        for res in phases:
            row = conn.execute(
                text(_LEDGER_SQL), {"lo": res.cpu["from"], "hi": res.cpu["to"]}
            ).one()
            n, bad, retried, msgs, batches, mean, biggest, wait, run = row
            if not n:
                continue
            lines.append(
                f"    ledger, {res.name}: {n} jobs created in the window, {bad} not succeeded, "
                f"{retried} with attempts > 1; {msgs} predict deliveries (Celery tasks), "
                f"{batches} batches of {float(mean or 0):.1f} jobs (max {biggest}); "
                f"created->started p50 {ms(wait[0])} p99 {ms(wait[1])}; "
                f"started->finished p50 {ms(run[0])} p99 {ms(run[1])}"
            )
    return lines


# --- setup -----------------------------------------------------------------------------


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@dataclass
class Env:
    base: Path
    env: dict[str, str]
    api_key: str
    naive_redis: str
    servers: list[Any]
    server_roots: dict[str, int]


def prepare(base: Path, servers: list[Any]) -> Env:
    """Servers (appended to ``servers`` as they start), settings in the environment, schema,
    customers, a production churn model."""
    roots: dict[str, int] = {}
    db_url = os.environ.get("INFERQ_DATABASE_URL", "")
    redis_url = os.environ.get("INFERQ_REDIS_URL", "")
    from shared.devstack.embedded import EmbeddedPostgres, EmbeddedRedis, isolated_env

    if not db_url:
        pg = EmbeddedPostgres(base / "pg", database="inferq_bench")
        servers.append(pg)
        db_url = pg.start()
        pid = pg._server.get_pid()
        if pid:
            roots["postgres"] = int(pid)
    else:
        print("using INFERQ_DATABASE_URL: its customers table is replaced", file=sys.stderr)
    if not redis_url:
        redis = EmbeddedRedis(base / "redis", appendonly=False)
        servers.append(redis)
        redis_url = _with_db(redis.start(), 1)
        naive_redis = _with_db(redis_url, 2)
        roots["redis"] = redis.process.pid
    else:
        naive_redis = os.environ.get("BENCH_NAIVE_REDIS_URL") or _with_db(redis_url, 2)
    api_key = "iq_bench_" + secrets.token_hex(16)
    os.environ.update(
        isolated_env(
            base, database_url=db_url, redis_url=redis_url, prefix="iqbench", api_key=api_key
        )
    )
    os.environ.update(
        {
            "INFERQ_RATE_LIMIT_PER_S": "0",
            "INFERQ_LOG_LEVEL": "WARNING",
            "INFERQ_PREDICTION_CACHE_TTL_S": "0",
            "INFERQ_ENV": "development",
            "INFERQ_FLOWER_PASSWORD": "bench-only",
            "BENCH_NAIVE_REDIS_URL": naive_redis,
        }
    )
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")

    from shared.db import dispose_engine, get_engine, session_scope
    from shared.devstack.cli import migrate_db
    from shared.devstack.demo import seed_customers
    from shared.models.training import train

    migrate_db()
    seed_customers(get_engine(), CUSTOMERS)
    with session_scope() as session:
        train(session, "churn", promote="always")
    dispose_engine()
    return Env(base, dict(os.environ), api_key, naive_redis, servers, roots)


def run_inferq(env: Env, args: argparse.Namespace) -> tuple[Any, dict]:
    from shared.devstack.embedded import free_port

    port = free_port()
    py = sys.executable
    logdir = env.base / "logs-inferq"
    logdir.mkdir()
    procs = [
        start(
            "worker",
            [py, "-m", "shared.devstack.cli", "worker", "-Q", "predict", "-c", "2"],
            env.env,
            logdir,
        ),
        start(
            "api",
            [
                py,
                "-m",
                "shared.devstack.cli",
                "api",
                "--port",
                str(port),
                "--processes",
                str(args.api_processes),
            ],
            env.env,
            logdir,
        ),
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", procs, 90)
        target = inferq_target(base, env.api_key)
        target.roots = {"api": procs[1].popen.pid, "worker": procs[0].popen.pid, **env.server_roots}
        target.description = "inferq api (1 uvicorn process) + inferq worker -Q predict -c 2"
        results = asyncio.run(measure(target, args.concurrency, args.rate, args.duration))
        target.extra = ledger_breakdown(results)
    finally:
        for p in reversed(procs):
            p.stop()
    logs = {p.name: scan_log(p.log) for p in procs}
    return (target, results), logs


def run_naive(env: Env, args: argparse.Namespace, rate: float | None) -> tuple[Any, dict]:
    from shared.devstack.embedded import free_port

    port = free_port()
    py = sys.executable
    logdir = env.base / "logs-naive"
    logdir.mkdir()
    penv = {**env.env, "BENCH_NAIVE_REDIS_URL": env.naive_redis}
    for var in THREAD_VARS:
        penv[var] = "1"
    procs = [
        start(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "bench.naive_tasks",
                "worker",
                "-c",
                "2",
                "--loglevel",
                "WARNING",
            ],
            penv,
            logdir,
        ),
        start(
            "api",
            [
                py,
                "-m",
                "uvicorn",
                "bench.naive_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            penv,
            logdir,
        ),
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", procs, 60)
        target = naive_target(base)
        target.roots = {"api": procs[1].popen.pid, "worker": procs[0].popen.pid, **env.server_roots}
        target.description = (
            "uvicorn bench.naive_app (1 process) + celery -A bench.naive_tasks worker -c 2"
        )

        async def first_job() -> None:
            async with _session(1) as session:
                await asyncio.wait_for(
                    target.wait(session, await target.submit(session, random_row())), 60
                )

        asyncio.run(first_job())
        results = asyncio.run(measure(target, args.concurrency, rate, args.duration))
    finally:
        for p in reversed(procs):
            p.stop()
    logs = {p.name: scan_log(p.log) for p in procs}
    return (target, results), logs


def start_stack(base: Path) -> tuple[Any, Env]:
    """``inferq up`` on its defaults (beat, Flower, INFO logs, the rate limit on), as a user
    starts it; and the settings the naive design needs to run beside it on its servers."""
    from bench.own_model_bench import Stack, stack_env
    from shared.devstack.embedded import free_port

    env, _ = stack_env()
    stack = Stack.start(base / "var", env, free_port(), free_port())
    try:
        stack.wait_ready(600)
    except BaseException:
        stack.stop()
        raise
    os.environ["INFERQ_DATABASE_URL"] = stack.database_url  # the ledger's queries
    roots = {k: v for k, v in stack.roots().items() if k in ("postgres", "redis")}
    penv = {**env, "INFERQ_DATABASE_URL": stack.database_url, "INFERQ_REDIS_URL": stack.redis_url}
    penv["INFERQ_DATA_DIR"] = str(stack.data_dir)
    return stack, Env(base, penv, "", _with_db(stack.redis_url, 2), [], roots)


def run_default(stack: Any, args: argparse.Namespace) -> tuple[Any, dict]:
    """inferq as ``inferq up`` runs it, loaded with a key of its own (rate 100,000/s)."""
    target = inferq_target(stack.api, stack.load_key())
    target.roots = stack.roots()
    target.description = (
        "inferq up, defaults (api, predict worker, score+ops worker, beat, Flower; "
        "INFO logs; rate limit on, checked per request)"
    )
    results = asyncio.run(measure(target, args.concurrency, args.rate, args.duration))
    target.extra = ledger_breakdown(results)
    logs = {name: scan_log(stack.data_dir / "logs" / f"{name}.log") for name in ("api", "worker")}
    return (target, results), logs


def run_floor(env: Env, args: argparse.Namespace, rate: float | None) -> tuple[Any, dict]:
    """The floor: ``bench.floor_app`` on the same uvicorn, the same load generator."""
    from shared.devstack.embedded import free_port

    port = free_port()
    logdir = env.base / "logs-floor"
    logdir.mkdir()
    args_ = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--host", "127.0.0.1"]
    args_ += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    procs = [start("api", args_, env.env, logdir)]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", procs, 60)
        target = dataclasses.replace(inferq_target(base, "none"), name="floor")
        target.roots = {"api": procs[0].popen.pid}
        target.description = "uvicorn bench.floor_app (1 process): 202 on POST, stored body on GET"
        results = asyncio.run(measure(target, args.concurrency, rate, args.duration))
    finally:
        procs[0].stop()
    return (target, results), {"floor": scan_log(procs[0].log)}


# --- report ----------------------------------------------------------------------------


def _cpu_line(cpu: dict[str, Any], roots: Iterable[str], jobs: int) -> list[str]:
    wall = cpu["wall"]
    drv = cpu["driver"] / (wall * NCPU) * 100
    lines = [f"    load generator CPU  {drv:5.1f}% of {NCPU} cores ({cpu['driver']:.2f} CPU-s)"]
    ours = cpu["driver"]
    for name in roots:
        v = cpu.get(name, 0.0)
        ours += v
        per_job = f", {v / jobs * 1000:.2f} ms/job" if jobs else ""
        procs = cpu.get(name + "/procs", [])
        split = (
            " [" + " + ".join(f"{x:.2f}" for x in procs) + " by process]"
            if 1 < len(procs) <= 4
            else f" [{len(procs)} processes]"
            if len(procs) > 4
            else ""
        )
        share = f"{v / wall * 100:3.0f}% of a core"
        lines.append(f"    CPU {name + ':':<16} {v:5.2f} CPU-s, {share}{per_job}{split}")
    busy, stolen = cpu["machine_busy"], cpu["stolen"]
    lines.append(
        f"    machine busy        {busy / (wall * NCPU) * 100:5.1f}% of {NCPU} cores; "
        f"other processes {max(0.0, busy - stolen - ours):.2f} CPU-s; "
        f"stolen by the hypervisor {stolen / (wall * NCPU) * 100:.1f}%"
    )
    return lines


def _lat(label: str, values: list[float]) -> str:
    return f"    {label:<10} p50 {ms(pct(values, 50)):>9}  p99 {ms(pct(values, 99)):>9}"


def _errors(res: PhaseResult) -> str:
    if not res.errors:
        return "0 errors"
    return f"{sum(res.errors.values())} errors: " + "; ".join(
        f"{k} x{v}" for k, v in res.errors.most_common(5)
    )


def report(target: Target, results: list[PhaseResult], logs: dict, args: argparse.Namespace) -> str:
    closed, open_, idle_, cold, asleep = results
    roots = list(target.roots)
    out = [f"== {target.name}: {target.description} =="]
    out.append(
        f"  closed loop, {args.concurrency} clients, {closed.seconds:.1f} s after {WARMUP_S:.0f} s"
        f" warm-up: {closed.jobs / closed.seconds:8.1f} jobs/s ({closed.jobs} jobs, "
        f"{_errors(closed)})"
    )
    out.append(_lat("submit", closed.submit))
    out.append(_lat("completion", closed.complete))
    out += _cpu_line(closed.cpu, roots, closed.jobs)
    out.append(
        f"  open loop, {open_.offered:.0f} jobs/s offered for {args.duration:.0f} s: "
        f"{open_.submitted} of {len(open_.lag)} offered jobs accepted; during the window "
        f"202s came back at {open_.accepted / open_.seconds:.1f}/s and results at "
        f"{open_.jobs / open_.seconds:.1f}/s (achieved); {_errors(open_)}"
    )
    out.append(_lat("submit", open_.submit))
    out.append(_lat("completion", open_.complete))
    out.append(
        f"    of the submit, client-side wait for a pooled connection p50 "
        f"{ms(pct(open_.pool, 50))} p99 {ms(pct(open_.pool, 99))}; driver schedule lag p50 "
        f"{ms(pct(open_.lag, 50))} p99 {ms(pct(open_.lag, 99))} (planned instant to POST start)"
    )
    out += _cpu_line(open_.cpu, roots, open_.jobs)
    out.append(
        f"  idle, {IDLE_JOBS} jobs one at a time: end to end p50 {ms(pct(idle_.complete, 50))}, "
        f"p99 {ms(pct(idle_.complete, 99))} (submit p50 {ms(pct(idle_.submit, 50))}; "
        f"{_errors(idle_)})"
    )
    out.append(
        f"    load generator CPU  {idle_.cpu['driver'] / (idle_.cpu['wall'] * NCPU) * 100:5.1f}%"
        f" of {NCPU} cores"
    )
    out.append(
        f"  cold, {COLD_JOBS} jobs each after {COLD_GAP_S:g} s of quiet: end to end p50 "
        f"{ms(pct(cold.complete, 50))}, p99 {ms(pct(cold.complete, 99))} (submit p50 "
        f"{ms(pct(cold.submit, 50))}; {_errors(cold)})"
    )
    out.append(
        f"  asleep, {ASLEEP_JOBS} jobs each after {ASLEEP_GAP_S:g} s of quiet: end to end p50 "
        f"{ms(pct(asleep.complete, 50))}, p99 {ms(pct(asleep.complete, 99))} (submit p50 "
        f"{ms(pct(asleep.submit, 50))}; {_errors(asleep)})"
    )
    out += target.extra
    for name, scan in logs.items():
        c = scan["counts"]
        out.append(
            f"  {name} log: {c['lines']} lines, {c['warning']} warnings, {c['error']} errors, "
            f"{c['critical']} critical, {c['tracebacks']} tracebacks"
        )
        for msg, n in sorted(scan["samples"].items(), key=lambda kv: -kv[1])[:5]:
            out.append(f"    x{n}: {msg}")
    return "\n".join(out)


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"machine: {NCPU} cores (nproc), {model}; Python {platform.python_version()}; "
        f"load average at start {load[0]:.2f}\n"
        f"single-thread speed: {single_thread_mops():.1f} M loop iterations/s "
        "(pure Python, best of 5)\n"
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC"
    )


def single_thread_mops(n: int = 2_000_000) -> float:
    """Millions of iterations per second of a fixed pure-Python loop, the best of five: a
    figure to set machines side by side (the same code on one core)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        acc = 0
        for i in range(n):
            acc += i * i & 7
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def code_version() -> str:
    """The commit measured, and whether the working tree differs from it (outside bench/)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", ".", ":!bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    except OSError:
        return "code: unknown (no git)"
    extra = f" + uncommitted changes in {len(dirty)} files" if dirty else ""
    return f"code: git {sha or 'unknown'}{extra}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open-loop jobs/s offered (default: half of inferq's closed-loop jobs/s)",
    )
    p.add_argument(
        "--config",
        choices=("default", "stripped"),
        default="default",
        help="default: inferq up as a user starts it; stripped: api + predict worker only, "
        "logs at WARNING, no rate limit, no prediction cache",
    )
    p.add_argument("--skip-naive", action="store_true", help="no naive design")
    p.add_argument("--skip-floor", action="store_true", help="no floor")
    p.add_argument("--api-processes", type=int, default=1, help="api processes (stripped)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")

    header = [
        "inferq load benchmark: online predict jobs, one random churn row each, over HTTP",
        machine(),
        code_version(),
        f"args: --config {args.config} --duration {args.duration:g} --concurrency "
        f"{args.concurrency} --rate {args.rate or 'half of the closed loop'}"
        + (" --skip-naive" if args.skip_naive else "")
        + (" --skip-floor" if args.skip_floor else ""),
        "client: aiohttp, one event loop in this process; every system below ran in this "
        "run, one after the other, on the same servers",
    ]
    print("\n".join(header), flush=True)
    base = Path(tempfile.mkdtemp(prefix="inferq-load-"))
    servers: list[Any] = []
    stack: Any = None
    runs: dict[str, list[PhaseResult]] = {}
    targets: list[Target] = []
    try:
        if args.config == "default":
            stack, env = start_stack(base)
            print(f"inferq up ready after {stack.ready_s:.1f} s", file=sys.stderr, flush=True)
            (target, results), logs = run_default(stack, args)
        else:
            env = prepare(base, servers)
            print("servers ready, churn trained; measuring inferq ...", file=sys.stderr)
            (target, results), logs = run_inferq(env, args)
        targets.append(target)
        runs["inferq"] = results
        print(report(target, results, logs, args), flush=True)
        rate = results[1].offered  # the others get inferq's open-loop load
        others = [("floor", run_floor)] if not args.skip_floor else []
        others += [("naive", run_naive)] if not args.skip_naive else []
        for name, run in others:
            print(f"measuring the {name} ...", file=sys.stderr, flush=True)
            (target, results), logs = run(env, args, rate)
            targets.append(target)
            runs[name] = results
            print(report(target, results, logs, args), flush=True)
        print(comparison(targets, runs), flush=True)
        return 0
    finally:
        if stack is not None:
            for note in stack.stop():
                print(f"inferq up: {note}", file=sys.stderr)
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"could not stop {type(server).__name__}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def comparison(targets: list[Target], runs: dict[str, list[PhaseResult]]) -> str:
    """The ratios, each against its target, from the phases of this run."""
    rate = {name: r[0].jobs / r[0].seconds for name, r in runs.items()}
    lines = ["== comparison (same run) =="]
    lines.append(
        "  same model: the test suite's churn row scores "
        + ", ".join(
            f"{t.name} {t.check:.6f}"
            for t in targets
            if t.check is not None and t.name != "floor"  # the floor has no model
        )
    )
    if rate.get("naive"):
        lines.append(
            f"  closed-loop jobs/s inferq/naive = {rate['inferq']:.1f} / {rate['naive']:.1f} = "
            f"{rate['inferq'] / rate['naive']:.2f}x (target >= 10x)"
        )
    if rate.get("floor"):
        lines.append(
            f"  closed-loop POST+GET pairs/s inferq/floor = {rate['inferq']:.1f} / "
            f"{rate['floor']:.1f} = {rate['inferq'] / rate['floor']:.2f} (target >= 0.60)"
        )
    _, open_, idle_, cold, asleep = runs["inferq"]
    lines.append(
        f"  inferq open loop at {open_.offered:g} jobs/s (half its closed loop): p99 submit "
        f"{ms(pct(open_.submit, 99))} (target < 25 ms); cold p50 {ms(pct(cold.complete, 50))} "
        f"(target < 10 ms); idle p50 {ms(pct(idle_.complete, 50))}; after "
        f"{ASLEEP_GAP_S:g} s of quiet p50 {ms(pct(asleep.complete, 50))}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
