"""The engine and the session factory. Nothing else in inferq calls ``create_engine``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings

__all__ = ["get_engine", "session_scope", "SessionLocal", "dispose_engine", "relax_commits"]

_engine: Engine | None = None
_options = ""
SessionLocal = sessionmaker(expire_on_commit=False)


def get_engine() -> Engine:
    """The process's engine, created on first use (after a fork, see ``dispose_engine``)."""
    global _engine
    if _engine is None:
        settings = get_settings()
        _engine = create_engine(
            settings.database_url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            pool_timeout=5,
            connect_args={
                "connect_timeout": 3,
                "application_name": "inferq",
                **({"options": _options} if _options else {}),
            },
        )
        SessionLocal.configure(bind=_engine)
    return _engine


def dispose_engine() -> None:
    """Forget the engine; a forked child must not reuse its parent's connections."""
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


def relax_commits() -> None:
    """This process's commits stop waiting for the WAL flush (a fsync costs milliseconds
    here, most of an idle job's latency). Only for worker processes, whose every write is
    idempotent and re-run from the ledger if a Postgres crash loses it; the API's insert
    behind the 202 keeps synchronous commits."""
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
