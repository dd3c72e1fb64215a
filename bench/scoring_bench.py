"""Population scoring: inferq's chunked binary-COPY engine against the tutorial engine.

    .venv/bin/python -m bench.scoring_bench --customers 1000000

Starts embedded PostgreSQL and Redis (or uses INFERQ_DATABASE_URL / INFERQ_REDIS_URL),
seeds N synthetic customers, trains churn, then in one run:

- inferq: a real API and a real worker (``inferq worker -Q score -c 2``); a score job is
  submitted over HTTP and timed until ``succeeded``; the predictions are counted.
- tutorial: ``LIMIT 10000 OFFSET k`` read with ``pandas.read_sql`` on a fresh connection
  per batch, ``predict_proba``, and a CSV ``copy_from`` back, in one process.

Prints rows/s for both, the ratio, and the peak RSS (VmHWM) of each worker process.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    from shared.supervisor import stop_process_group

    stop_process_group(proc, 15)


def run_inferq(base: Path, n: int, workers: int) -> tuple[float, dict[str, float]]:
    import httpx

    from shared.embedded import free_port

    worker = _start(["worker", "-Q", "score", "-c", str(workers)], base / "worker.log")
    port = free_port()
    api = _start(["api", "--port", str(port)], base / "api.log")
    try:
        url = f"http://127.0.0.1:{port}"
        key = os.environ["INFERQ_BOOTSTRAP_API_KEY"]
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stack not ready; see {base}")
                time.sleep(0.2)
            start = time.perf_counter()
            job = c.post("/v1/jobs", json={"type": "score", "model": "churn"}).json()
            while job["status"] in ("queued", "running"):
                job = c.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
            elapsed = time.perf_counter() - start
        if job["status"] != "succeeded":
            raise RuntimeError(f"score job ended {job['status']}: {job['error']}")
        _check_rows(job["result"]["run_id"], n)
        memory = {f"child {pid}": _vmhwm_mb(pid) for pid in _children(worker.pid)}
        memory["parent"] = _vmhwm_mb(worker.pid)
        return elapsed, memory
    finally:
        _stop(api)
        _stop(worker)


def _check_rows(run_id: str, n: int) -> None:
    from sqlalchemy import text

    from shared.db import session_scope

    with session_scope() as session:
        total, distinct = session.execute(
            text("SELECT count(*), count(DISTINCT entity_id) FROM predictions WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    if (total, distinct) != (n, n):
        raise RuntimeError(f"run {run_id}: {total} rows, {distinct} customers; expected {n}")


def run_tutorial(n: int, batch: int = 10_000) -> float:
    """What the tutorials show: OFFSET pagination, pandas, predict_proba, CSV copy_from."""
    import pandas as pd
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from shared.catalog import CHURN_SCHEMA
    from shared.db import session_scope
    from shared.registry import ModelCache

    with session_scope() as session:
        model = ModelCache().get(session, "churn", 1).estimator  # the scikit-learn pipeline
    engine = create_engine(os.environ["INFERQ_DATABASE_URL"], poolclass=NullPool)
    features = [f["name"] for f in CHURN_SCHEMA["features"]]
    codes = {
        f["name"]: {c: i for i, c in enumerate(f["categories"])}
        for f in CHURN_SCHEMA["features"]
        if f["type"] == "str"
    }
    run_id = str(uuid.uuid4())
    start = time.perf_counter()
    k = 0
    while True:
        with engine.connect() as conn:  # a fresh connection per batch
            df = pd.read_sql(f"SELECT * FROM customers ORDER BY id LIMIT {batch} OFFSET {k}", conn)
        if df.empty:
            break
        X = df[features].copy()
        for col, mapping in codes.items():
            X[col] = X[col].map(mapping)
        proba = model.predict_proba(X.to_numpy(dtype=float))[:, 1]
        out = pd.DataFrame(
            {
                "run_id": run_id,
                "entity_id": df["id"],
                "model": "churn",
                "version": 1,
                "score": proba,
                "label": proba >= 0.5,
                "scored_at": datetime.now(UTC).isoformat(),
            }
        )
        buf = io.StringIO()
        out.to_csv(buf, index=False, header=False)
        buf.seek(0)
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.copy_from(buf, "predictions", sep=",", columns=list(out.columns))
            raw.commit()
        finally:
            raw.close()
        k += batch
    elapsed = time.perf_counter() - start
    _check_rows(run_id, n)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--skip-tutorial", action="store_true")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    servers = []
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis

    if not os.environ.get("INFERQ_DATABASE_URL"):
        pg = EmbeddedPostgres(base / "pg")
        os.environ["INFERQ_DATABASE_URL"] = pg.start()
        servers.append(pg)
    if not os.environ.get("INFERQ_REDIS_URL"):
        redis = EmbeddedRedis(base / "redis", appendonly=False)
        os.environ["INFERQ_REDIS_URL"] = redis.start()
        servers.append(redis)
    os.environ.update(
        {
            "INFERQ_DATA_DIR": str(base / "data"),
            "INFERQ_BOOTSTRAP_API_KEY": "bench-" + uuid.uuid4().hex,
            "INFERQ_REDIS_PREFIX": "bench" + uuid.uuid4().hex[:6],
            "INFERQ_LOG_LEVEL": "WARNING",
            "INFERQ_RATE_LIMIT_PER_S": "0",
        }
    )
    try:
        from tqdm import tqdm

        from shared.cli import migrate_db
        from shared.db import get_engine, session_scope
        from shared.features import seed_customers
        from shared.training import train

        migrate_db()
        t = time.perf_counter()
        with tqdm(total=args.customers, unit="rows", desc="seeding", file=sys.stderr) as bar:
            seed_customers(get_engine(), args.customers, on_progress=bar.update)
        seed_s = time.perf_counter() - t
        with session_scope() as session:
            train(session, "churn", promote="always")

        inferq_s, memory = run_inferq(base, args.customers, args.workers)
        tutorial_s = None if args.skip_tutorial else run_tutorial(args.customers)

        n = args.customers
        print(f"machine : {os.cpu_count()} cores, {_cpu_model()}")
        print(f"date    : {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(f"customers: {n:,} (seeded in {seed_s:.1f} s, not timed below)")
        print(
            f"inferq  : {inferq_s:6.2f} s  {n / inferq_s:>12,.0f} rows/s  "
            f"({args.workers} worker processes, read + scored + written back)"
        )
        if tutorial_s is not None:
            print(
                f"tutorial: {tutorial_s:6.2f} s  {n / tutorial_s:>12,.0f} rows/s  "
                "(LIMIT/OFFSET + pandas.read_sql + predict_proba + CSV copy_from)"
            )
            print(f"speed-up: {tutorial_s / inferq_s:.1f}x")
        peak = max(v for k, v in memory.items() if k.startswith("child"))
        print(f"worker peak RSS: {peak:.0f} MB per pool process (parent {memory['parent']:.0f} MB)")
    finally:
        for server in reversed(servers):
            server.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
