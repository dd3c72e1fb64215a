"""``inferq models`` and ``inferq keys``: the registry and API keys, from the database."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shared.devstack.cli_common import JSON_OPTION, _settings


@click.group()
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


@click.group()
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


@click.command()
@click.argument("model")
@click.option("--version", type=int, default=None, help="Default: the production version.")
@click.option("--window", type=float, default=None, help="Seconds (default INFERQ_DRIFT_WINDOW_S).")
@JSON_OPTION
def drift(model: str, version: int | None, window: float | None, as_json: bool) -> None:
    """Compute a drift report of MODEL's online traffic now, store it, publish its figures
    to /metrics and print it."""
    from datetime import UTC, datetime, timedelta

    from redis import Redis

    from shared.db import session_scope
    from shared.models.registry import get_version, production_versions
    from shared.monitoring.reports import NoReferenceError, as_dict, online_report, publish

    with session_scope() as session:
        number = version or production_versions(session).get(model)
        mv = get_version(session, model, number) if number else None
        if mv is None:
            what = f"version {version}" if version else "a production version"
            raise click.ClickException(f"model {model!r} has no {what}")
        since = datetime.now(UTC) - timedelta(seconds=window) if window else None
        try:
            found = online_report(session, mv, since=since)
        except NoReferenceError as exc:
            raise click.ClickException(str(exc)) from None
        report = as_dict(found)
        publish(Redis.from_url(_settings().redis_url, socket_connect_timeout=3), found)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{model} v{report['version']}: {report['rows_window']} rows in the window "
        f"({report['window']['start']} to {report['window']['end']}), "
        f"{report['rows_reference']} in the reference"
    )
    if not report["enough_rows"]:
        click.echo("too few rows to judge (INFERQ_DRIFT_MIN_ROWS): nothing is flagged")
    click.echo(f"{'feature':<24} {'test':<5} {'value':>9} {'p-value':>10} {'PSI':>7}  drifted")
    entries = [
        *report["features"],
        *([{"feature": "(score)", **report["score"]}] if report["score"] else []),
    ]
    for f in entries:
        value = "-" if f.get("value") is None else f"{f['value']:.4f}"
        p = "-" if f.get("p_value") is None else f"{f['p_value']:.2e}"
        psi = "-" if f.get("psi") is None else f"{f['psi']:.3f}"
        flag = "YES" if f.get("drifted") else ""
        click.echo(f"{f['feature']:<24} {f['statistic']:<5} {value:>9} {p:>10} {psi:>7}  {flag}")
    click.echo("drift: " + ("YES" if report["drifted"] else "none"))
