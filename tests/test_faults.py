"""The fault-injection suite (bench/faults.py), short: two faults under 20 s of load.

It runs ``inferq up`` on a PostgreSQL and a Redis of its own (it kills them, so never the
suite's servers) with every INFERQ_* setting of the suite removed from the stack's
environment, SIGKILLs a prefork child of the predict worker and crashes PostgreSQL
(``pg_ctl restart -m immediate``) while two tenants submit jobs, and reconciles every job
against the ledger. About a minute.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import faults


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (its servers, its stack)."""
    found = []
    for pid, _, args in faults.ps_table():
        if str(path) in args and faults.alive(pid):
            found.append(f"{pid} {args[:120]}")
    return found


def test_a_killed_pool_process_and_a_postgres_crash_lose_no_job_and_write_none_twice(
    tmp_path: Path,
) -> None:
    base = tmp_path / "faults"
    opts = faults.Options(
        seconds=20,
        rate=50,
        faults=["pool-kill", "pg-restart"],
        customers=3000,
        warmup=3,
        gap=2,
        settle=20,
        drain=60,
        keep=base,
    )
    try:
        out = faults.run(opts)
        failed = [f"{c.name}: {c.failures}; {c.detail}" for c in out.checks if not c.ok]
        assert not failed, "\n".join(failed) + "\n" + out.report
        assert [f["name"] for f in out.faults] == ["pool-kill", "pg-restart"]
        for figures in out.faults:
            assert figures["affected"] > 0, figures
            assert figures["recovery"] is not None, figures
        assert (base / "requests.jsonl").exists()  # --keep keeps the raw records
        assert not _processes_mentioning(base), _processes_mentioning(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
