"""The model registry: versions in Postgres, artifacts on disk, sha256 checked before loading."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.orm import ModelVersion
from shared.runtime import onnx_predictor, sklearn_predictor

__all__ = [
    "IntegrityError",
    "LoadedModel",
    "ModelCache",
    "register",
    "promote",
    "production_versions",
    "get_version",
    "list_versions",
]

log = logging.getLogger(__name__)


class IntegrityError(RuntimeError):
    """An artifact whose bytes do not match the sha256 in the registry: never loaded."""


@dataclass
class LoadedModel:
    """A version ready to predict: ``predict(X)`` gives (scores, labels or None).

    Classifier: score is the positive-class probability, label ``score >= threshold``.
    Regressor: score is the value, no label. Anomaly: score is the anomaly score (higher is
    more anomalous), label true for an anomaly. ``runtime`` says what computes them:
    ``onnx`` where the pipeline converts exactly (see ``shared.runtime``), else ``sklearn``.
    """

    name: str
    version: int
    kind: str
    schema: dict[str, Any]
    threshold: float | None
    estimator: Any
    runtime: str = "sklearn"
    _predict: Any = None

    def __post_init__(self) -> None:
        if self._predict is None:
            self._predict = sklearn_predictor(self.kind, self.estimator, self.threshold)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._predict(X)  # type: ignore[no-any-return]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register(
    session: Session,
    *,
    name: str,
    kind: str,
    estimator: Any,
    schema: dict[str, Any],
    metrics: dict[str, float],
    threshold: float | None = None,
    training_window: dict[str, Any] | None = None,
) -> ModelVersion:
    """Store ``estimator`` as the next version of ``name`` (stage ``staging``)."""
    # One writer per model name at a time, so version numbers never collide.
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": f"registry:{name}"})
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    version = (latest or 0) + 1
    buf = io.BytesIO()
    joblib.dump(estimator, buf, compress=3)
    data = buf.getvalue()
    digest = _sha256(data)
    model_dir = get_settings().model_dir
    assert model_dir is not None
    path = Path(model_dir) / name / f"v{version}-{digest[:12]}.joblib"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a reader never sees half an artifact
    mv = ModelVersion(
        name=name,
        version=version,
        kind=kind,
        artifact_path=str(path.resolve()),
        sha256=digest,
        input_schema=schema,
        metrics=metrics,
        threshold=threshold,
        training_window=training_window,
        stage="staging",
    )
    session.add(mv)
    session.flush()
    log.info("registered %s v%s sha256=%s", name, version, digest)
    return mv


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


def load_artifact(mv: ModelVersion) -> LoadedModel:
    """Read the artifact, refuse it unless its sha256 matches the registry, then unpickle."""
    data = Path(mv.artifact_path).read_bytes()
    digest = _sha256(data)
    if digest != mv.sha256:
        raise IntegrityError(
            f"artifact of {mv.name} v{mv.version} has sha256 {digest}, registry says {mv.sha256}"
        )
    estimator = joblib.load(io.BytesIO(data))
    model = LoadedModel(mv.name, mv.version, mv.kind, mv.input_schema, mv.threshold, estimator)
    if get_settings().onnx:
        fast = onnx_predictor(mv.kind, estimator, mv.threshold, mv.input_schema)
        if fast is not None:
            model.runtime, model._predict = "onnx", fast
    return model


class ModelCache:
    """One per process: each version is loaded once and kept (versions are immutable)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.Lock()

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
                model = load_artifact(mv)
                self._models[key] = model
                log.info("loaded %s v%s (runtime %s)", name, version, model.runtime)
            return model

    def warm(self, session: Session) -> list[tuple[str, int]]:
        """Load every production version not yet in memory; returns what was loaded."""
        loaded = []
        for name, version in production_versions(session).items():
            if (name, version) not in self._models:
                self.get(session, name, version)
                loaded.append((name, version))
        return loaded
