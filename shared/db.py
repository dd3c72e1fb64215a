"""The engines and the session factory. Nothing else in inferq calls ``create_engine``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings

__all__ = [
    "get_engine",
    "session_scope",
    "SessionLocal",
    "dispose_engine",
    "relax_commits",
    "libpq_dsn",
    "autocommit",
]

_engine: Engine | None = None
_autocommit_engine: Engine | None = None
_options = ""
SessionLocal = sessionmaker(expire_on_commit=False)


def _create(**kw: object) -> Engine:
    return create_engine(
        get_settings().database_url,
        pool_timeout=5,
        connect_args={
            "connect_timeout": 3,
            "application_name": "inferq",
            **({"options": _options} if _options else {}),
        },
        **kw,
    )


def get_engine() -> Engine:
    """The process's engine, created on first use (after a fork, see ``dispose_engine``)."""
    global _engine
    if _engine is None:
        _engine = _create(pool_pre_ping=True, pool_size=10, max_overflow=20)
        SessionLocal.configure(bind=_engine)
    return _engine


def libpq_dsn() -> str:
    """``INFERQ_DATABASE_URL`` as libpq reads it, for connections made without the engine
    (the API's asynchronous ledger writer, see ``api.pgasync``)."""
    url = make_url(get_settings().database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def dispose_engine() -> None:
    """Forget the engines; a forked child must not reuse its parent's connections."""
    global _engine, _autocommit_engine
    for engine in (_engine, _autocommit_engine):
        if engine is not None:
            engine.dispose(close=False)
    _engine = _autocommit_engine = None


def relax_commits() -> None:
    """This process's commits stop waiting for the WAL flush (a fsync costs milliseconds
    here, most of an idle job's latency), except those that end a job
    (``shared.jobs.DURABLE``: a result a client may read must survive a crash). Only for
    worker processes, whose other writes are idempotent and re-run from the ledger if a
    Postgres crash loses them; the API's insert behind the 202 keeps synchronous commits."""
    global _options
    _options = "-c synchronous_commit=off"
    dispose_engine()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on error and always closes."""
    get_engine()
    session = SessionLocal()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which every statement commits on its own, for the predict hot path:
    a one-statement transaction costs one round trip, with no BEGIN or COMMIT of its own.

    From a pool of its own whose connections stay in autocommit, so a checkout sends
    nothing (no isolation-level reset, no ping). A connection the server dropped fails
    its first statement with ``OperationalError``, which invalidates the pool; callers
    retry (the predict task does, with backoff).
    """
    global _autocommit_engine
    if _autocommit_engine is None:
        _autocommit_engine = _create(isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=8)
    with _autocommit_engine.connect() as conn:
        yield conn
