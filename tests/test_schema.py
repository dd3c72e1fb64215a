"""Alembic owns the schema: migrations create it from nothing and agree with the models."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from shared.db import get_engine
from shared.orm import Base, include_object
from tests.conftest import ROOT


def test_models_and_migrations_agree(stack) -> None:  # type: ignore[no-untyped-def]
    with get_engine().connect() as conn:
        opts = {"compare_type": True, "include_object": include_object}
        ctx = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_migrate_creates_the_schema_on_an_empty_database() -> None:
    url = make_url(os.environ["INFERQ_DATABASE_URL"])
    name = f"inferq_empty_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = url.set(database=name)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "shared.devstack.cli", "migrate"],
            cwd=ROOT,
            env={**os.environ, "INFERQ_DATABASE_URL": fresh.render_as_string(hide_password=False)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        engine = create_engine(fresh)
        tables = set(inspect(engine).get_table_names())
        assert {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"} == tables
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
