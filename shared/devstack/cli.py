"""The ``inferq`` command: its processes (up, api, worker, beat, flower), migrations, demo
data and training. The ``models`` and ``keys`` groups are ``cli_admin``'s, ``submit`` is
``cli_client``'s; what every command shares is ``cli_common``'s."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from shared.devstack.cli_common import (
    JSON_OPTION,
    PROCESSES,
    THREAD_VARS,
    _Commands,
    _logging,
    _quiet_logging,
    _settings,
)

__all__ = ["main"]


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Show informational log lines too.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """inferq: asynchronous inference for scikit-learn models."""
    ctx.obj = {"verbose": verbose}
    if ctx.invoked_subcommand not in PROCESSES:
        _quiet_logging()


# --- processes -------------------------------------------------------------------------


@main.command()
@click.option("--port", default=None, type=int, help="API port (default INFERQ_API_PORT, 8000).")
@click.option("--flower-port", default=5555, show_default=True)
@click.option("--workers", default=None, type=int, help="Prefork processes (default 2).")
@click.option("--data-dir", default=None, type=click.Path(path_type=Path))
@click.option("--customers", default=20_000, show_default=True, help="Demo customers to seed.")
def up(
    port: int | None, flower_port: int, workers: int | None, data_dir: Path | None, customers: int
) -> None:
    """The whole stack on this machine: embedded servers where no URL is set."""
    from shared.devstack.supervisor import run_stack

    sys.exit(
        run_stack(
            port=port,
            flower_port=flower_port,
            workers=workers,
            data_dir=data_dir,
            customers=customers,
        )
    )


@main.command()
@click.option("--host", default=None, help="Bind address (default INFERQ_API_HOST).")
@click.option("--port", default=None, type=int)
@click.option("--processes", default=1, show_default=True, help="uvicorn worker processes.")
def api(host: str | None, port: int | None, processes: int) -> None:
    """The HTTP API (uvicorn)."""
    import uvicorn

    s = _settings()
    uvicorn.run(
        "api.main:app",
        host=host or s.api_host,
        port=port or s.api_port,
        workers=processes,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default="predict,score,ops", show_default=True)
@click.option(
    "-c", "--concurrency", default=None, type=int, help="Default INFERQ_WORKER_CONCURRENCY."
)
@click.option("-n", "--hostname", default=None, help="Celery node name.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str, concurrency: int | None, hostname: str | None, celery_args: tuple) -> None:
    """A Celery worker (prefork), one BLAS thread per process, SIGTERM = soft shutdown."""
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")
    # Read by billiard at import: SIGTERM re-queues what the worker holds after a grace period.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    _logging("worker")
    _keep_our_logging()
    from workers.app import celery_app

    s = _settings()
    argv = [
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency or s.worker_concurrency),
        "--loglevel",
        s.log_level,
        "-E",
        "--without-mingle",
        "--without-gossip",
    ]
    if hostname:
        argv += ["-n", hostname]
    # -q: no banner on stdout; every line the worker writes is a JSON log line.
    celery_app.start(["-q", *argv, *celery_args])


def _keep_our_logging() -> None:
    """Celery configures logging itself unless a receiver of ``setup_logging`` does: the
    one here keeps what ``_logging`` set up (JSON lines with the job id)."""
    from celery.signals import setup_logging

    setup_logging.connect(lambda **_: None, weak=False)


@main.command()
def beat() -> None:
    """Celery beat: the schedule of workers/beat.py. Run exactly one."""
    _logging("beat")
    from workers.app import celery_app

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    _keep_our_logging()
    # -q: no banner on stdout; every line beat writes is a JSON log line.
    celery_app.start(["-q", "beat", "--loglevel", s.log_level])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True)
def flower(host: str, port: int) -> None:
    """Flower, always behind basic auth (INFERQ_FLOWER_USER / INFERQ_FLOWER_PASSWORD)."""
    s = _settings()
    if not s.flower_password:
        raise click.UsageError("set INFERQ_FLOWER_PASSWORD: Flower never runs without auth")
    _logging("flower")
    from workers.app import celery_app

    # Through Flower's environment, not its command line, which every user of the
    # machine can read (ps).
    os.environ["FLOWER_BASIC_AUTH"] = f"{s.flower_user}:{s.flower_password}"
    celery_app.start(
        # --logging=none: Tornado adds no handler of its own; its lines go through ours.
        [
            "flower",
            f"--address={host}",
            f"--port={port}",
            "--purge_offline_workers=60",
            "--logging=none",
        ]
    )


# --- database, data and registry -----------------------------------------------------


def migrate_db() -> None:
    from alembic import command
    from alembic.config import Config

    # A checkout holds migrations/ beside the packages; an installed package (the image)
    # runs from the directory that holds them.
    checkout = Path(__file__).resolve().parents[2]
    root = next((d for d in (checkout, Path.cwd()) if (d / "migrations" / "env.py").exists()), None)
    if root is None:
        raise click.ClickException(
            f"no migrations/ in {checkout} or {Path.cwd()}: run from the directory that holds them"
        )
    ini = root / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(root / "migrations"))
    command.upgrade(cfg, "head")


@main.command()
def migrate() -> None:
    """Apply the Alembic migrations (alembic upgrade head)."""
    migrate_db()
    click.echo("database at head")


@main.command()
@click.option("--customers", default=20_000, show_default=True, help="Rows to write.")
@click.option("--seed", "seed_value", default=42, show_default=True)
@click.option("--append", is_flag=True, help="Add them after the last id instead of replacing.")
@click.option(
    "--shift",
    type=float,
    default=0.0,
    is_flag=False,
    flag_value=1.0,
    help="Move the population (--shift alone: 1.0): a retrain then differs, drift shows.",
)
def seed(customers: int, seed_value: int, append: bool, shift: float) -> None:
    """Write deterministic synthetic customers (replacing the table unless --append)."""
    from tqdm import tqdm

    from shared.db import get_engine
    from shared.devstack.demo import seed_customers

    with tqdm(total=customers, unit="rows", desc="seeding customers", file=sys.stderr) as bar:
        first = seed_customers(
            get_engine(),
            customers,
            seed=seed_value,
            on_progress=bar.update,
            append=append,
            shift=shift,
        )
    moved = f", shifted by {shift:g}" if shift else ""
    what = "added" if append else "seeded"
    click.echo(f"{what} {customers} customers (ids {first} to {first + customers - 1}{moved})")


@main.command()
@click.argument("model")
@click.option("--promote", "promote", flag_value="always", help="Promote whatever the metrics.")
@click.option(
    "--if-better",
    "promote",
    flag_value="if_better",
    default=True,
    help="Promote if it beats production (default).",
)
@click.option("--no-promote", "promote", flag_value="never")
@JSON_OPTION
def train(model: str, promote: str, as_json: bool) -> None:
    """Train a new version of MODEL (churn, demand, anomaly) and register it."""
    from shared.db import session_scope
    from shared.models.catalog import SPECS
    from shared.models.training import train as train_model

    if model not in SPECS:
        raise click.BadParameter(f"unknown model {model!r}; known: {', '.join(SPECS)}")
    with session_scope() as session:
        result = train_model(session, model, promote=promote)
    if as_json:
        click.echo(json.dumps(result))
        return
    metrics = " ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
    verdict = "promoted to production" if result["promoted"] else "not promoted"
    click.echo(f"{model} v{result['version']} trained: {metrics}; {verdict}")


@main.command("_bootstrap-demo", hidden=True)
@click.option("--customers", default=20_000)
def bootstrap_demo(customers: int) -> None:
    """Seed demo customers and train every built-in model, where nothing is there yet."""
    from sqlalchemy import exists, select, table

    from shared.db import get_engine, session_scope
    from shared.devstack.demo import seed_customers
    from shared.models.catalog import SPECS
    from shared.models.registry import production_versions
    from shared.models.training import train as train_model

    with session_scope() as session:
        has_customers = session.scalar(select(exists().select_from(table("customers"))))
    if not has_customers:
        click.echo(f"inferq: seeding {customers} demo customers", err=True)
        seed_customers(get_engine(), customers)
    for name in SPECS:
        with session_scope() as session:
            if name not in production_versions(session):
                click.echo(f"inferq: training the first {name} model", err=True)
                train_model(session, name, promote="always")


# --- client -----------------------------------------------------------------------------


# The groups kept in modules of their own join the command here.
from shared.devstack import cli_admin, cli_client  # noqa: E402

main.add_command(cli_admin.models)
main.add_command(cli_admin.keys)
main.add_command(cli_admin.drift)
main.add_command(cli_client.submit)

if __name__ == "__main__":
    main()
