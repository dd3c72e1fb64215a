"""The ``inferq`` command line: processes, registry, keys, demo data and a client."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

__all__ = ["main"]

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


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Show informational log lines too.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """inferq: asynchronous inference for scikit-learn models."""
    ctx.obj = {"verbose": verbose}
    if ctx.invoked_subcommand not in PROCESSES:
        _quiet_logging()


#: Commands that run a long-lived process, which logs JSON lines itself.
PROCESSES = frozenset({"api", "worker", "beat", "flower", "up"})
PROGRESS_POLL_S = 0.2
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


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
    from shared.supervisor import run_stack

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

    root = Path(__file__).resolve().parent.parent
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
    from shared.features import seed_customers

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
    from sqlalchemy import text

    from shared.db import get_engine, session_scope
    from shared.features import seed_customers
    from shared.models.catalog import SPECS
    from shared.models.registry import production_versions
    from shared.models.training import train as train_model

    with session_scope() as session:
        has_customers = session.execute(text("SELECT EXISTS (SELECT 1 FROM customers)")).scalar()
    if not has_customers:
        click.echo(f"inferq: seeding {customers} demo customers", err=True)
        seed_customers(get_engine(), customers)
    for name in SPECS:
        with session_scope() as session:
            if name not in production_versions(session):
                click.echo(f"inferq: training the first {name} model", err=True)
                train_model(session, name, promote="always")


@main.group()
def models() -> None:
    """The model registry."""


@models.command("list")
@JSON_OPTION
def models_list(as_json: bool) -> None:
    """Every version: name, version, stage, kind, metrics."""
    from shared.db import session_scope
    from shared.models.registry import list_versions

    with session_scope() as session:
        versions = list_versions(session)
        if as_json:
            rows = [
                {
                    "name": v.name,
                    "version": v.version,
                    "stage": v.stage,
                    "kind": v.kind,
                    "metrics": v.metrics,
                }
                for v in versions
            ]
            click.echo(json.dumps(rows))
            return
        for v in versions:
            metrics = " ".join(f"{k}={val:.4f}" for k, val in v.metrics.items())
            click.echo(f"{v.name:10} v{v.version:<4} {v.stage:10} {v.kind:10} {metrics}")


@models.command("register")
@click.argument("name")
@click.argument("artifact")
@click.option(
    "--kind",
    type=click.Choice(["auto", "classifier", "regressor", "anomaly"]),
    default="auto",
    show_default=True,
)
@click.option("--schema", "schema_path", type=click.File("r"), help="Declared input schema (JSON).")
@click.option(
    "--sample", "sample_path", type=click.File("rb"), help="Rows like the training data (CSV)."
)
@click.option("--threshold", type=float, default=None, help="Binary decision threshold.")
@click.option("--feature-table", default=None, help="Table for entity_ids and score jobs.")
@click.option("--key", default=None, help="The feature table's integer key column (default id).")
@click.option(
    "--tenant-column", default=None, help="The feature table's column naming each row's tenant."
)
@click.option("--trust", "trusted", multiple=True, help="A skops type to trust (repeatable).")
@click.option("--promote", is_flag=True, help="Make the new version production.")
def models_register(
    name: str,
    artifact: str,
    kind: str,
    schema_path,  # type: ignore[no-untyped-def]
    sample_path,
    threshold: float | None,
    feature_table: str | None,
    key: str | None,
    tenant_column: str | None,
    trusted: tuple[str, ...],
    promote: bool,
) -> None:
    """Register ARTIFACT as a new version of NAME.

    ARTIFACT is a .skops, .joblib or .pkl file, a local MLflow model directory, or an
    MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH) resolved against
    INFERQ_MLFLOW_TRACKING_URI.
    """
    from shared.db import session_scope
    from shared.models.follow import from_mlflow
    from shared.models.intake import IntakeError, Submission, register_artifact, sample_frame
    from shared.models.registry import promote as promote_version

    try:
        sub = Submission(
            name=name,
            data=b"",
            kind=kind,
            schema=json.load(schema_path) if schema_path else None,
            sample=sample_frame(sample_path.read()) if sample_path else None,
            threshold=threshold,
            feature_table=feature_table,
            key=key,
            tenant_column=tenant_column,
            trusted=list(trusted),
        )
        path = Path(artifact)
        if path.is_file():
            sub.data, sub.filename = path.read_bytes(), path.name
        else:
            from_mlflow(sub, artifact, _settings().mlflow_tracking_uri)
        with session_scope() as session:
            mv = register_artifact(session, sub)
            if promote:
                promote_version(session, name=name, version=mv.version)
            version, stage = mv.version, mv.stage
    except IntakeError as exc:
        raise click.ClickException(f"{exc.field}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"schema: not JSON: {exc}") from None
    click.echo(f"registered {name} v{version} ({stage})")


@models.command("follow")
@click.argument("name")
@click.argument("uri")
def models_follow(name: str, uri: str) -> None:
    """Keep NAME's production version in step with an MLflow alias (models:/M@ALIAS).

    Imports and promotes the version the alias points at now; beat then checks it every
    INFERQ_MLFLOW_POLL_S.
    """
    from shared.db import session_scope
    from shared.models.follow import follow
    from shared.models.intake import IntakeError

    try:
        with session_scope() as session:
            mv = follow(session, name, uri, _settings().mlflow_tracking_uri)
            version = mv.version
    except IntakeError as exc:
        raise click.ClickException(f"{exc.field}: {exc}") from None
    click.echo(f"{name} follows {uri}: v{version} is production")


@models.command("promote")
@click.argument("model")
@click.argument("version", type=int)
def models_promote(model: str, version: int) -> None:
    from shared.db import session_scope
    from shared.models.registry import promote

    with session_scope() as session:
        try:
            promote(session, name=model, version=version)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"{model} v{version} is now production")


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("list")
@JSON_OPTION
def keys_list(as_json: bool) -> None:
    """Every key: id, tenant, name, scopes, created, revoked (never the key itself)."""
    from shared.db import session_scope
    from shared.keys import list_keys

    with session_scope() as session:
        found = list_keys(session)
        if as_json:
            click.echo(
                json.dumps(
                    [
                        {
                            "id": k.id,
                            "tenant": k.tenant,
                            "name": k.name,
                            "scopes": k.scopes,
                            "created_at": k.created_at.isoformat(),
                            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                        }
                        for k in found
                    ]
                )
            )
            return
        for k in found:
            revoked = k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-"
            click.echo(
                f"{k.id:<5} {k.tenant:16} {k.name or '-':16} {','.join(k.scopes):34} "
                f"{k.created_at.isoformat(timespec='seconds')} revoked={revoked}"
            )


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke key KEY_ID; API processes stop accepting it within 10 s."""
    from shared.db import session_scope
    from shared.keys import revoke_key

    with session_scope() as session:
        if not revoke_key(session, key_id):
            raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"key {key_id} revoked")


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--scopes", default="jobs:write,jobs:read", show_default=True)
@click.option("--name", default="")
@click.option("--rate", type=float, default=None, help="Requests/s for this key.")
def keys_create(tenant: str, scopes: str, name: str, rate: float | None) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from shared.db import session_scope
    from shared.keys import create_key

    with session_scope() as session:
        try:
            _, value = create_key(
                session, tenant=tenant, scopes=scopes.split(","), name=name, rate_limit_per_s=rate
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    click.echo(value)


# --- client -----------------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("--input", "input_path", type=click.File("r"), help="JSON rows ('-' = stdin).")
@click.option("--entity-ids", default=None, help="Comma-separated ids instead of --input.")
@click.option("--score", "score", is_flag=True, help="Score the whole customer base.")
@click.option("--segment", default=None, help="With --score: JSON filters on columns.")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--url", default=None, help="API base URL (default http://API_HOST:API_PORT).")
@click.option("--api-key", envvar="INFERQ_API_KEY", required=True, help="Or INFERQ_API_KEY.")
@JSON_OPTION
def submit(
    model: str,
    input_path,
    entity_ids: str | None,
    score: bool,
    segment: str | None,
    wait: bool,
    url: str | None,
    api_key: str,
    as_json: bool,
) -> None:  # type: ignore[no-untyped-def]
    """Submit a predict (or --score) job and, by default, wait for it with a progress bar."""
    import httpx
    from tqdm import tqdm

    s = _settings()
    base = url or f"http://{s.api_host}:{s.api_port}"
    body: dict = {"type": "predict", "model": model}
    if score:
        body["type"] = "score"
        body["segment"] = json.loads(segment) if segment else {}
    elif entity_ids:
        body["entity_ids"] = [int(x) for x in entity_ids.split(",")]
    elif input_path is not None:
        body["inputs"] = json.load(input_path)
    else:
        raise click.UsageError("give --input ROWS.json, --entity-ids or --score")
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=40) as client:
        r = client.post("/v1/jobs", json=body)
        if r.status_code >= 400:
            raise click.ClickException(f"{r.status_code}: {r.text}")
        job = r.json()
        if not as_json:
            click.echo(f"job {job['id']} {job['status']}", err=True)
        bar = None
        while wait and job["status"] in ("queued", "running"):
            if job["type"] != "predict" and not as_json:
                time.sleep(PROGRESS_POLL_S)  # a bar to move: look again shortly
                job = client.get(f"/v1/jobs/{job['id']}").json()
            else:  # nothing to show meanwhile: wait for the end (up to a second a call)
                job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 1}).json()
            progress = job.get("progress")
            if progress and progress.get("total") and not as_json:
                if bar is None:  # counting from here, so the rate is the real one
                    bar = tqdm(
                        total=progress["total"],
                        initial=progress["done"],
                        unit="rows",
                        desc=job["type"],
                        file=sys.stderr,
                    )
                bar.update(progress["done"] - bar.n)
        if bar is not None:
            bar.close()
        click.echo(json.dumps(job, indent=2) if as_json else _job_text(job))
        if job["status"] == "failed":
            sys.exit(1)


def _job_text(job: dict) -> str:
    """A job as a person reads it: one line, then its rows or its result's parts."""
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        from datetime import datetime

        secs = (
            datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
        ).total_seconds()
        took = f" in {secs:.2f} s"
    version = f" v{job['model_version']}" if job.get("model_version") else ""
    lines = [f"job {job['id']} {job['status']}{took} ({job['type']}, {job['model']}{version})"]
    error, result = job.get("error"), job.get("result") or {}
    if error:
        lines.append(f"error {error.get('code')}: {error.get('message')}")
    predictions = result.get("predictions")
    if predictions:
        keys = [k for k in predictions[0] if k != "row"]
        lines.append("  ".join(["row", *keys]))
        for i, p in enumerate(predictions[:50]):
            cells = [f"{p[k]:.4f}" if isinstance(p[k], float) else str(p[k]) for k in keys]
            lines.append("  ".join([str(p.get("row", i)), *cells]))
        if len(predictions) > 50:
            lines.append(f"... {len(predictions) - 50} more rows (--json prints them all)")
    elif result:
        for k, v in result.items():
            shown = json.dumps(v) if isinstance(v, dict | list) else v
            lines.append(f"{k}: {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
