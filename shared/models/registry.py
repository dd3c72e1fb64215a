"""The model registry: versions and their artifact bytes in Postgres, verified before loading.

Artifact bytes live in ``model_artifacts``, keyed by sha256, so a worker on any machine
needs only the database URL to load any version. Each process keeps a copy on local disk
(``INFERQ_MODEL_DIR/cache/<sha256>``) and checks the bytes against the registry's sha256
before every load, whichever copy they come from: a cached copy that no longer matches is
fetched again, and bytes in the database that no longer match are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.models import formats
from shared.models.encoding import (
    columns_from_codes,
    columns_from_rows,
    encode_rows,
    model_input,
    rows_input,
)
from shared.models.lookup import LookupRuntime
from shared.models.runtime import Kind, OnnxRuntime, Output, Runtime, SklearnRuntime
from shared.orm import ModelArtifact, ModelVersion

__all__ = [
    "ArtifactIntegrityError",
    "LoadedModel",
    "ModelCache",
    "store_artifact",
    "register",
    "register_estimator",
    "promote",
    "production_versions",
    "get_version",
    "list_versions",
    "load_version",
    "build",
]

log = logging.getLogger(__name__)


class ArtifactIntegrityError(RuntimeError):
    """An artifact whose bytes do not match the sha256 in the registry: never loaded."""


@dataclass
class LoadedModel:
    """A version ready to predict. ``predict(X)`` takes the model input of a batch (see
    ``shared.models.schema``), ``predict_rows`` validated JSON rows, ``predict_columns``
    one array per feature, ``predict_codes`` the codes matrix (``encode_rows``); each
    returns an ``Output``. ``runtime`` names what computes it: ``onnx`` where the pipeline
    converts exactly, ``sklearn_lookup`` where a DataFrame pipeline runs from its codes to
    the same bits (``shared.models.lookup``: rows and codes go that way), else ``sklearn``."""

    name: str
    version: int
    kind: str
    schema: dict[str, Any]
    threshold: float | None
    estimator: Any
    classes: list[Any] | None = None
    _runtime: Runtime | None = field(default=None, repr=False)
    _codes: Runtime | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._runtime is None:
            self._runtime = SklearnRuntime.load(self.estimator, self.spec)

    @property
    def spec(self) -> Kind:
        return Kind(self.kind, self.threshold, tuple(self.classes) if self.classes else None)

    @property
    def runtime(self) -> str:
        assert self._runtime is not None
        return (self._codes or self._runtime).name

    @property
    def compiled_trees(self) -> bool:
        """Whether its trees are walked by ``shared.models.trees``' compiled loop."""
        return bool(getattr(self._codes, "trees", False))

    def use(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def use_codes(self, runtime: Runtime) -> None:
        """Predict rows and codes with ``runtime``, which takes the codes matrix."""
        self._codes = runtime

    def predict(self, X: Any) -> Output:
        assert self._runtime is not None
        return self._runtime.predict(X)

    def predict_rows(self, rows: list[dict[str, Any]]) -> Output:
        if self._codes is not None:
            try:
                X = encode_rows(rows, self.schema)
            except KeyError:  # a string outside the categories: the estimator decides
                pass
            else:
                return self._codes.predict(X)
        return self.predict(rows_input(rows, self.schema))

    def predict_codes(self, X: Any) -> Output:
        if self.schema.get("input") == "codes":
            return self.predict(X)
        if self._codes is not None:
            return self._codes.predict(X)
        return self.predict_columns(columns_from_codes(X, self.schema))

    def predict_columns(self, columns: dict[str, Any]) -> Output:
        return self.predict(model_input(columns, self.schema))

    def check_rows(self, rows: list[dict[str, Any]]) -> Output:
        """``predict_rows`` through the model's own columns path too (as score jobs
        build them), so a registration tries both ways in."""
        self.predict_columns(columns_from_rows(rows, self.schema))
        return self.predict_rows(rows)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_artifact(session: Session, data: bytes, fmt: str) -> str:
    """Keep ``data`` in the database (once per content); returns its sha256."""
    digest = _sha256(data)
    session.execute(
        pg_insert(ModelArtifact)
        .values(sha256=digest, format=fmt, size=len(data), data=data)
        .on_conflict_do_nothing(index_elements=["sha256"])
    )
    return digest


def register(
    session: Session,
    *,
    name: str,
    kind: str,
    data: bytes,
    fmt: str,
    schema: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    threshold: float | None = None,
    classes: list[Any] | None = None,
    trusted: list[str] | None = None,
    source: dict[str, Any] | None = None,
    training_window: dict[str, Any] | None = None,
    reference_profile: dict[str, Any] | None = None,
) -> ModelVersion:
    """Store ``data`` as the next version of ``name`` (stage ``staging``)."""
    # One writer per model name at a time, so version numbers never collide.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"registry:{name}"))))
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    digest = store_artifact(session, data, fmt)
    mv = ModelVersion(
        name=name,
        version=(latest or 0) + 1,
        kind=kind,
        artifact_format=fmt,
        sha256=digest,
        input_schema=schema,
        metrics=metrics or {},
        threshold=threshold,
        classes=classes,
        trusted_types=trusted or [],
        source=source,
        training_window=training_window,
        reference_profile=reference_profile,
        stage="staging",
    )
    session.add(mv)
    session.flush()
    log.info("registered %s v%s (%s, sha256=%s)", name, mv.version, fmt, digest)
    return mv


def register_estimator(session: Session, *, estimator: Any, **kw: Any) -> ModelVersion:
    """Register an estimator inferq fitted itself, as a skops file."""
    data, trusted = formats.dump(estimator)
    classes = getattr(estimator, "classes_", None)
    return register(
        session,
        data=data,
        fmt="skops",
        trusted=trusted,
        classes=[c.item() if hasattr(c, "item") else c for c in classes]
        if classes is not None
        else None,
        **kw,
    )


def promote(session: Session, *, name: str, version: int) -> ModelVersion:
    """Make ``version`` the production version of ``name``; the previous one is archived."""
    mv = get_version(session, name, version)
    if mv is None:
        raise LookupError(f"model {name!r} has no version {version}")
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.stage == "production")
        .values(stage="archived")
    )
    mv.stage = "production"
    mv.promoted_at = datetime.now(UTC)
    session.flush()
    log.info("promoted %s v%s to production", name, version)
    return mv


def production_versions(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(ModelVersion.name, ModelVersion.version).where(ModelVersion.stage == "production")
    )
    return {name: version for name, version in rows}


def get_version(session: Session, name: str, version: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def list_versions(session: Session, name: str | None = None) -> list[ModelVersion]:
    q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
    if name is not None:
        q = q.where(ModelVersion.name == name)
    return list(session.scalars(q))


def _cache_path(digest: str) -> Path:
    model_dir = get_settings().model_dir
    assert model_dir is not None
    return Path(model_dir) / "cache" / digest


def artifact_bytes(session: Session, mv: ModelVersion) -> bytes:
    """The version's artifact, from the local cache or the database, matching its sha256."""
    path = _cache_path(mv.sha256)
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    if data is not None and _sha256(data) == mv.sha256:
        return data
    if data is not None:
        log.warning("cached artifact %s does not match its sha256; fetching it again", path)
    data = session.scalar(select(ModelArtifact.data).where(ModelArtifact.sha256 == mv.sha256))
    if data is None:
        raise ArtifactIntegrityError(f"artifact of {mv.name} v{mv.version} is missing")
    data = bytes(data)
    digest = _sha256(data)
    if digest != mv.sha256:
        raise ArtifactIntegrityError(
            f"artifact of {mv.name} v{mv.version} has sha256 {digest}, registry says {mv.sha256}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: another process never reads half a file
    except OSError:
        log.warning("could not cache artifact at %s", path, exc_info=True)
    return data


def build(
    name: str,
    version: int,
    *,
    kind: str,
    estimator: Any,
    schema: dict[str, Any],
    threshold: float | None,
    classes: list[Any] | None,
) -> LoadedModel:
    """A ``LoadedModel`` on the fastest runtime that agrees with scikit-learn."""
    model = LoadedModel(name, version, kind, schema, threshold, estimator, classes)
    if get_settings().onnx:
        assert model._runtime is not None
        fast = OnnxRuntime.load(estimator, model.spec, schema, model._runtime)
        if fast is not None:
            model.use(fast)
    if model.runtime == "sklearn":
        assert isinstance(model._runtime, SklearnRuntime)
        lookup = LookupRuntime.load(
            estimator, model.spec, schema, model._runtime, trees=get_settings().compiled_trees
        )
        if lookup is not None:
            model.use_codes(lookup)
    return model


def load_version(session: Session, mv: ModelVersion) -> LoadedModel:
    """Read the artifact, refuse it unless its sha256 matches the registry, then load it
    trusting only the types approved at registration."""
    data = artifact_bytes(session, mv)
    estimator = formats.load(data, mv.artifact_format, mv.trusted_types or ())
    return build(
        mv.name,
        mv.version,
        kind=mv.kind,
        estimator=estimator,
        schema=mv.input_schema,
        threshold=mv.threshold,
        classes=mv.classes,
    )


class ModelCache:
    """One per process: each version is loaded once and kept (versions are immutable)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.Lock()
        self._unloadable: set[tuple[str, int]] = set()  # logged once, not every poll

    def cached(self, name: str, version: int) -> LoadedModel | None:
        """The version if this process has loaded it already, else None (no database)."""
        return self._models.get((name, version))

    def get(self, session: Session, name: str, version: int) -> LoadedModel:
        key = (name, version)
        model = self._models.get(key)
        if model is not None:
            return model
        with self._lock:
            model = self._models.get(key)
            if model is None:
                mv = get_version(session, name, version)
                if mv is None:
                    raise LookupError(f"model {name!r} has no version {version}")
                model = load_version(session, mv)
                self._models[key] = model
                log.info(
                    "loaded %s v%s (runtime %s%s)",
                    name,
                    version,
                    model.runtime,
                    ", compiled trees" if model.compiled_trees else "",
                )
            return model

    def warm(self, session: Session) -> list[tuple[str, int]]:
        """Load every production version not yet in memory; returns what was loaded."""
        loaded = []
        for name, version in production_versions(session).items():
            key = (name, version)
            if key not in self._models and key not in self._unloadable:
                try:
                    self.get(session, name, version)
                except (LookupError, ArtifactIntegrityError, formats.ArtifactError) as exc:
                    log.error("could not preload %s v%s: %s", name, version, exc)
                    self._unloadable.add(key)
                    continue
                loaded.append(key)
        return loaded
