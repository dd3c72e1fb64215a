"""MLflow for teams that already use it: import a version by URI, follow a registry alias.

``inferq models follow NAME models:/NAME@ALIAS`` records the follow and imports the version
the alias points at; beat's ``ops.mlflow_sync`` then checks every ``INFERQ_MLFLOW_POLL_S``
and, when the alias has moved, imports that version (once: an MLflow version imported
before is promoted again, not copied) and makes it production. Running workers pick the
promotion up like any other (``INFERQ_MODEL_POLL_S``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import registry
from shared.models.intake import IntakeError, Submission, register_artifact
from shared.models.mlflow_source import (
    MlflowSourceError,
    alias_version,
    fetch,
    is_mlflow_uri,
    is_model_dir,
    read_model_dir,
)
from shared.orm import ModelFollow, ModelVersion

__all__ = ["from_mlflow", "follow", "sync_follows"]

log = logging.getLogger(__name__)


def from_mlflow(sub: Submission, ref: str, tracking_uri: str) -> None:
    """Fill ``sub`` with the model at ``ref``: a local MLflow model directory or an MLflow
    URI resolved against ``tracking_uri``; ``IntakeError`` when it does not resolve."""
    try:
        if is_model_dir(ref):
            found = read_model_dir(Path(ref))
        elif is_mlflow_uri(ref):
            if not tracking_uri:
                raise IntakeError(
                    "uri", f"{ref}: set INFERQ_MLFLOW_TRACKING_URI to resolve MLflow URIs"
                )
            found = fetch(ref, tracking_uri)
        else:
            raise IntakeError(
                "artifact", f"{ref}: no such model file, MLflow model directory or MLflow URI"
            )
    except MlflowSourceError as exc:
        raise IntakeError("uri", str(exc)) from None
    sub.data, sub.fmt, sub.signature = found.data, found.format, found.signature
    sub.source = {**found.source, **(sub.source or {})}
    sub.filename = None
    # A skops model in MLflow names the types its registrant trusted (MLflow refuses to
    # log it otherwise); importing from that registry takes their word for it.
    sub.trusted = [*sub.trusted, *(found.source.get("skops_trusted_types") or [])]


def _imported(session: Session, name: str, mlflow_version: str | None) -> ModelVersion | None:
    if mlflow_version is None:
        return None
    for mv in registry.list_versions(session, name):
        if (mv.source or {}).get("mlflow_version") == mlflow_version:
            return mv
    return None


def _import(session: Session, name: str, uri: str, tracking_uri: str) -> ModelVersion:
    """The inferq version of what ``uri`` points at now, imported if new, and promoted."""
    current = alias_version(uri, tracking_uri)
    mv = _imported(session, name, current)
    if mv is None:
        sub = Submission(name=name, data=b"")
        from_mlflow(sub, uri, tracking_uri)
        mv = register_artifact(session, sub)
    if mv.stage != "production":
        registry.promote(session, name=name, version=mv.version)
    return mv


def follow(session: Session, name: str, uri: str, tracking_uri: str) -> ModelVersion:
    """Keep ``name``'s production version in step with the alias ``uri``; imports and
    promotes the version it points at now."""
    if not tracking_uri:
        raise IntakeError("uri", "set INFERQ_MLFLOW_TRACKING_URI to follow an MLflow alias")
    try:
        mv = _import(session, name, uri, tracking_uri)
    except MlflowSourceError as exc:
        raise IntakeError("uri", str(exc)) from None
    row = session.get(ModelFollow, name) or ModelFollow(name=name)
    row.uri = uri
    row.mlflow_version = (mv.source or {}).get("mlflow_version")
    row.checked_at, row.error = datetime.now(UTC), None
    session.add(row)
    session.flush()
    return mv


def sync_follows(session_factory, tracking_uri: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """One check of every follow: (name, version) of each promotion it made."""
    promoted: list[tuple[str, int]] = []
    with session_factory() as session:
        follows = [(f.name, f.uri, f.mlflow_version) for f in session.scalars(select(ModelFollow))]
    for name, uri, known in follows:
        try:
            with session_factory() as session:
                current = alias_version(uri, tracking_uri)
                row = session.get(ModelFollow, name)
                assert row is not None
                row.checked_at, row.error = datetime.now(UTC), None
                if current != known:
                    mv = _import(session, name, uri, tracking_uri)
                    row.mlflow_version = current
                    promoted.append((name, mv.version))
                    log.info(
                        "%s now follows %s at MLflow version %s: v%s",
                        name,
                        uri,
                        current,
                        mv.version,
                    )
        except (MlflowSourceError, IntakeError) as exc:
            log.error("could not sync %s with %s: %s", name, uri, exc)
            with session_factory() as session:
                row = session.get(ModelFollow, name)
                if row is not None:
                    row.checked_at, row.error = datetime.now(UTC), str(exc)
    return promoted
