"""What every ``inferq`` command shares: settings, logging, one-line errors, ``--json``."""

from __future__ import annotations

import click

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _settings():  # type: ignore[no-untyped-def]
    from shared.config import get_settings

    return get_settings()


def _logging(process: str) -> None:
    """Logs of a long-running process (api, worker, beat, flower): INFERQ_LOG_LEVEL, JSON."""
    from shared.logs import configure_logging

    s = _settings()
    configure_logging(level=s.log_level, json_lines=s.log_json, process=process)


def _quiet_logging() -> None:
    """Logs of a command run by a person: warnings and errors only, as plain lines on
    stderr, so its own output stays readable; ``inferq -v`` shows everything."""
    from shared.logs import configure_logging

    verbose = bool((click.get_current_context().find_root().obj or {}).get("verbose"))
    configure_logging(level="INFO" if verbose else "WARNING", json_lines=False, process="cli")


class _Commands(click.Group):
    """Configuration mistakes and unreachable servers end in one line naming the setting,
    not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        from pydantic import ValidationError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from sqlalchemy.exc import OperationalError

        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            raise click.ClickException(_settings_problem(exc)) from None
        except OperationalError as exc:
            raise click.ClickException(
                f"cannot reach the database at {_where('database_url')} (INFERQ_DATABASE_URL): "
                f"{_first_line(exc.orig)}; start it, or run `inferq up` for embedded servers"
            ) from None
        except RedisConnectionError as exc:
            raise click.ClickException(
                f"cannot reach Redis at {_where('redis_url')} (INFERQ_REDIS_URL): "
                f"{_first_line(exc)}; start it, or run `inferq up` for embedded servers"
            ) from None


def _settings_problem(exc: Exception) -> str:
    errors: list[dict] = getattr(exc, "errors", list)()
    lines = []
    for e in errors:
        field = ".".join(str(x) for x in e.get("loc", ()) if x)
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"INFERQ_{field.upper()}: {msg}" if field else msg)
    return "; ".join(lines) or _first_line(exc)


def _first_line(exc: object) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _where(name: str) -> str:
    """Host, port and database of a configured URL, never its password."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(getattr(_settings(), name))
    except Exception:
        return "the configured address"
    host = url.host or url.query.get("host") or "localhost"
    return f"{host}:{url.port}/{url.database}" if url.port else f"{host}/{url.database}"


#: Commands that run a long-lived process, which logs JSON lines itself.
PROCESSES = frozenset({"api", "worker", "beat", "flower", "up"})


PROGRESS_POLL_S = 0.2


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
