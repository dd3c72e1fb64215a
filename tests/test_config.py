"""Settings in the forms people paste, and one line (never a traceback) for a mistake."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import ConfigurationError, database_url, redis_url
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://u:p@db.example.com:5432/inferq",
        "postgres://u:p@db.example.com:5432/inferq",
        "postgresql+psycopg2://u:p@db.example.com:5432/inferq",
        "POSTGRES://u:p@db.example.com:5432/inferq",
    ],
)
def test_every_common_postgres_url_form_means_psycopg2(given: str) -> None:
    assert database_url(given) == "postgresql+psycopg2://u:p@db.example.com:5432/inferq"


@pytest.mark.parametrize("given", ["mysql://u@h/db", "postgresql+psycopg://u@h/db", "h:5432/db"])
def test_other_database_urls_are_refused_by_name(given: str) -> None:
    with pytest.raises(ConfigurationError, match="INFERQ_DATABASE_URL must be a"):
        database_url(given)


@pytest.mark.parametrize("given", ["redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///r.sock"])
def test_redis_url_forms(given: str) -> None:
    assert redis_url(given, "INFERQ_REDIS_URL") == given


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="INFERQ_BROKER_URL") as info:
        redis_url("amqp://user:secret@h:5672//", "INFERQ_BROKER_URL")
    assert "secret" not in str(info.value)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.devstack.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_takes_the_url_as_providers_print_it(stack) -> None:  # type: ignore[no-untyped-def]
    ours = os.environ["INFERQ_DATABASE_URL"]
    for scheme in ("postgresql", "postgres"):
        plain = scheme + "://" + ours.partition("://")[2]
        out = _cli("migrate", INFERQ_DATABASE_URL=plain)
        assert out.returncode == 0, out.stderr
        assert "database at head" in out.stdout


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"INFERQ_DATABASE_URL": "mysql://u:pw@h/db"}, "INFERQ_DATABASE_URL must be a PostgreSQL"),
        ({"INFERQ_REDIS_URL": "http://h"}, "INFERQ_REDIS_URL must be a Redis URL"),
        (
            {"INFERQ_DATABASE_URL": "postgresql://postgres:pw@127.0.0.1:1/nothing"},
            "cannot reach the database at 127.0.0.1:1/nothing (INFERQ_DATABASE_URL)",
        ),
    ],
)
def test_configuration_mistakes_are_one_line(env: dict[str, str], says: str) -> None:
    out = _cli("migrate", **env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr
    assert "pw" not in lines[0]
