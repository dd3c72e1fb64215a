"""The demo's lifecycle can be watched: fresh, shifted customers make a retrain differ."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import ROOT


def test_appending_shifted_customers_makes_a_retrain_differ_and_if_better_decide() -> None:
    url = make_url(os.environ["INFERQ_DATABASE_URL"])
    name = f"inferq_demo_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    env = {
        **os.environ,
        "INFERQ_DATABASE_URL": url.set(database=name).render_as_string(hide_password=False),
    }

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "shared.devstack.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        cli("migrate")
        assert "seeded 3000 customers (ids 1 to 3000)" in cli("seed", "--customers", "3000")
        first = cli("train", "churn", "--promote")
        again = cli("train", "churn")  # the same data: the same metrics, so not better
        assert _metrics(first) == _metrics(again) and "not promoted" in again
        added = cli("seed", "--append", "--customers", "3000", "--shift")
        assert "added 3000 customers (ids 3001 to 6000, shifted by 1)" in added
        shifted = cli("train", "churn")
        assert _metrics(shifted) != _metrics(first)
        assert re.search(r"churn v3 trained: .*; (promoted to production|not promoted)", shifted)
        engine = create_engine(env["INFERQ_DATABASE_URL"])
        with engine.connect() as conn:
            old, new = conn.execute(
                text(
                    "SELECT avg(support_tickets) FILTER (WHERE id <= 3000), "
                    "avg(support_tickets) FILTER (WHERE id > 3000) FROM customers"
                )
            ).one()
        engine.dispose()
        assert float(new) > float(old) + 0.5  # the population did move
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _metrics(line: str) -> str:
    return line.split("trained: ", 1)[1].split(";", 1)[0]
