"""Reading scikit-learn models out of MLflow: a local MLflow model directory, or a
``models:/`` / ``runs:/`` URI resolved against a tracking server.

This module owns the MLflow side only: parsing ``MLmodel``, resolving registry aliases and
versions, downloading artifacts. It hands back the serialized estimator's bytes untouched
(and never unpickles them). ``mlflow`` is an optional extra, imported inside functions; every
failure is raised as :class:`MlflowSourceError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.models.mlflow_client import (
    MlflowSourceError,
    call_server,
    error_code,
    missing_extra,
    one_line,
    shorten,
    tracking_client,
)

__all__ = [
    "MlflowModel",
    "MlflowSourceError",
    "alias_version",
    "fetch",
    "is_mlflow_uri",
    "is_model_dir",
    "read_model_dir",
]

MLMODEL_FILE = "MLmodel"
#: ``serialization_format`` of the sklearn flavour -> our format name.
_FORMATS = {"pickle": "pickle", "cloudpickle": "pickle", "skops": "skops"}


_MODELS_PREFIX = "models:/"
_RUNS_PREFIX = "runs:/"


@dataclass
class MlflowModel:
    """A scikit-learn model read out of MLflow."""

    #: The serialized estimator file's bytes, exactly as stored.
    data: bytes
    #: ``"pickle"`` (pickle or cloudpickle serialization) or ``"skops"``.
    format: str
    #: Input columns as ``[{"name": ..., "type": ...}]`` with MLflow type names; ``None``
    #: without a signature or with a tensor signature.
    signature: list[dict[str, Any]] | None
    #: Where it came from: ``uri``, ``mlflow_model``, ``mlflow_version``, ``run_id``,
    #: ``model_id`` (and, for skops, ``skops_trusted_types`` as the MLmodel file lists them).
    source: dict[str, Any] = field(default_factory=dict)


def is_mlflow_uri(s: str) -> bool:
    """True for ``models:/...`` and ``runs:/...`` URIs."""
    return isinstance(s, str) and s.startswith((_MODELS_PREFIX, _RUNS_PREFIX))


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """True for a local directory holding an ``MLmodel`` file."""
    try:
        return (Path(path) / MLMODEL_FILE).is_file()
    except (OSError, TypeError, ValueError):
        return False


def read_model_dir(path: str | os.PathLike[str], *, uri: str | None = None) -> MlflowModel:
    """Read the sklearn-flavour model saved in the MLflow model directory ``path``."""
    root = Path(path)
    label = uri or str(root)
    try:
        import yaml  # an MLflow dependency
    except ImportError:
        missing_extra()
    try:
        text = (root / MLMODEL_FILE).read_text(encoding="utf-8")
    except OSError as e:
        raise MlflowSourceError(f"{label}: not an MLflow model directory ({e.strerror})") from None
    try:
        # safe_load: the MLmodel file is as untrusted as the rest of the artifact.
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MlflowSourceError(
            f"{label}: unreadable MLmodel file ({shorten(one_line(e))})"
        ) from None
    if not isinstance(spec, dict):
        raise MlflowSourceError(f"{label}: unreadable MLmodel file (not a mapping)")

    flavors = spec.get("flavors") or {}
    sk = flavors.get("sklearn") if isinstance(flavors, dict) else None
    if not isinstance(sk, dict):
        names = ", ".join(flavors) if isinstance(flavors, dict) and flavors else "none"
        raise MlflowSourceError(f"{label}: not a scikit-learn model (flavours: {names})")
    serialization = sk.get("serialization_format") or "pickle"
    fmt = _FORMATS.get(str(serialization))
    if fmt is None:
        raise MlflowSourceError(f"{label}: unsupported serialization format {serialization!r}")
    data = _read_model_file(root, sk.get("pickled_model"), label)
    return MlflowModel(
        data=data,
        format=fmt,
        signature=_signature(spec.get("signature"), label),
        source={
            "uri": label,
            "mlflow_model": None,
            "mlflow_version": None,
            "run_id": spec.get("run_id"),
            "model_id": spec.get("model_id"),
            # The model's own claim of what skops may load: for the caller to vet, not to trust.
            **({"skops_trusted_types": sk.get("skops_trusted_types")} if fmt == "skops" else {}),
        },
    )


def fetch(uri: str, tracking_uri: str) -> MlflowModel:
    """Download the model at ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/MODEL_ID`` or ``runs:/RUN_ID/PATH`` from ``tracking_uri`` and read it."""
    if not is_mlflow_uri(uri):
        raise MlflowSourceError(f"{uri}: not a models:/ or runs:/ URI")
    with (
        tracking_client(uri, tracking_uri) as client,
        tempfile.TemporaryDirectory(prefix="inferq-mlflow-") as tmp,
    ):
        source: dict[str, Any] = {"mlflow_model": None, "mlflow_version": None, "run_id": None}
        if uri.startswith(_RUNS_PREFIX):
            run_id, artifact_path = _parse_runs_uri(uri)
            local = _download_run_model(client, uri, tracking_uri, run_id, artifact_path, tmp)
            source["run_id"] = run_id
        else:
            kind, name, ref = _parse_models_uri(uri)
            if kind == "model_id":
                artifact_uri = call_server(
                    uri, tracking_uri, lambda: _logged_model(client, uri, name)
                )
            else:
                mv = _model_version(client, uri, tracking_uri, kind, name, ref)
                source.update(mlflow_model=mv.name, mlflow_version=str(mv.version))
                source["run_id"] = mv.run_id or None
                artifact_uri = call_server(
                    uri,
                    tracking_uri,
                    lambda: client.get_model_version_download_uri(mv.name, mv.version),
                )
                if artifact_uri.startswith(_MODELS_PREFIX):  # the version's logged model
                    model_id = artifact_uri[len(_MODELS_PREFIX) :]
                    artifact_uri = call_server(
                        uri, tracking_uri, lambda: _logged_model(client, uri, model_id)
                    )
            local = _download(uri, tracking_uri, artifact_uri, tmp)
        model = read_model_dir(local, uri=uri)
    model.source.update(uri=uri, **{k: v for k, v in source.items() if v is not None})
    return model


def alias_version(uri: str, tracking_uri: str) -> str:
    """The version number the alias of ``models:/NAME@ALIAS`` points at now."""
    kind, name, alias = _parse_models_uri(uri)
    if kind != "alias":
        raise MlflowSourceError(f"{uri}: not of the form models:/NAME@ALIAS")
    with tracking_client(uri, tracking_uri) as client:
        return str(_model_version(client, uri, tracking_uri, kind, name, alias).version)


# --- MLmodel contents -------------------------------------------------------------------------


def _read_model_file(root: Path, name: Any, label: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise MlflowSourceError(f"{label}: the sklearn flavour names no pickled_model file")
    file = (root / name).resolve()
    # A crafted MLmodel could point anywhere on this machine.
    if not file.is_relative_to(root.resolve()):
        raise MlflowSourceError(f"{label}: pickled_model {name!r} lies outside the model directory")
    if not file.is_file():
        raise MlflowSourceError(f"{label}: model file {name!r} is missing or not a file")
    try:
        return file.read_bytes()
    except OSError as e:
        raise MlflowSourceError(
            f"{label}: cannot read model file {name!r} ({e.strerror})"
        ) from None


def _signature(sig: Any, label: str) -> list[dict[str, Any]] | None:
    if not isinstance(sig, dict) or not sig.get("inputs"):
        return None
    inputs = sig["inputs"]
    try:
        # In MLmodel the inputs are a JSON string inside the YAML.
        specs = json.loads(inputs) if isinstance(inputs, str) else inputs
    except ValueError:
        raise MlflowSourceError(f"{label}: unreadable signature inputs in MLmodel") from None
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise MlflowSourceError(f"{label}: unreadable signature inputs in MLmodel")
    if any(s.get("type") == "tensor" for s in specs):
        return None
    return [{"name": s.get("name"), "type": s.get("type")} for s in specs]


# --- URIs ---------------------------------------------------------------------------------------


def _parse_models_uri(uri: str) -> tuple[str, str, str]:
    """``(kind, name, ref)``: ``("alias", NAME, ALIAS)``, ``("version", NAME, VERSION)`` or
    ``("model_id", MODEL_ID, "")``."""
    if not isinstance(uri, str) or not uri.startswith(_MODELS_PREFIX):
        raise MlflowSourceError(f"{uri}: not a models:/ URI")
    rest = uri[len(_MODELS_PREFIX) :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name and "/" not in alias:
            return "alias", name, alias
    elif "/" in rest:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return "version", name, version
        if name and version and "/" not in version:
            raise MlflowSourceError(
                f"{uri}: version {version!r} is not a number (stages are deprecated; use an alias)"
            )
    elif rest:
        return "model_id", rest, ""
    raise MlflowSourceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def _parse_runs_uri(uri: str) -> tuple[str, str]:
    run_id, _, path = uri[len(_RUNS_PREFIX) :].partition("/")
    path = path.strip("/")
    if not run_id or not path:
        raise MlflowSourceError(f"{uri}: expected runs:/RUN_ID/PATH")
    return run_id, path


# --- server calls -------------------------------------------------------------------------------


def _model_version(client: Any, uri: str, tracking_uri: str, kind: str, name: str, ref: str) -> Any:
    if kind == "alias":
        return call_server(
            uri,
            tracking_uri,
            lambda: client.get_model_version_by_alias(name, ref),
            not_found=f"no version of registered model {name!r} has alias {ref!r}",
        )
    return call_server(
        uri,
        tracking_uri,
        lambda: client.get_model_version(name, ref),
        not_found=f"registered model {name!r} has no version {ref}",
    )


def _logged_model(client: Any, uri: str, model_id: str) -> str:
    try:
        return str(client.get_logged_model(model_id).artifact_location)
    except Exception as e:
        if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            raise MlflowSourceError(
                f"{uri}: no logged model {model_id!r} "
                "(registry models are models:/NAME@ALIAS or models:/NAME/VERSION)"
            ) from None
        raise


def _download_run_model(
    client: Any, uri: str, tracking_uri: str, run_id: str, path: str, tmp: str
) -> str:
    from mlflow.artifacts import list_artifacts

    run = call_server(
        uri, tracking_uri, lambda: client.get_run(run_id), not_found=f"no run {run_id!r}"
    )
    # Not client.list_artifacts/download_artifacts(run_id, ...): they go through runs:/ URIs,
    # whose logged-model fallback resolves against the process-global tracking URI.
    in_run = f"{run.info.artifact_uri.rstrip('/')}/{path}"
    listed = call_server(
        uri, tracking_uri, lambda: list_artifacts(artifact_uri=in_run, tracking_uri=tracking_uri)
    )
    if any(posixpath.basename(f.path) == MLMODEL_FILE for f in listed):
        return _download(uri, tracking_uri, in_run, tmp)
    # MLflow 3 keeps a model logged in a run as a "logged model" outside the run's artifacts,
    # found by its name (the first path segment) and source run.
    name, _, sub = path.partition("/")
    experiment_id = run.info.experiment_id

    def find() -> Any:
        token = None
        while True:
            page = client.search_logged_models(
                experiment_ids=[experiment_id],
                filter_string=f"name = '{name}'",
                page_token=token,
            )
            for m in page:
                if m.source_run_id == run_id:
                    return m
            token = page.token
            if not token:
                return None

    logged = call_server(uri, tracking_uri, find) if "'" not in name else None
    if logged is None:
        raise MlflowSourceError(f"{uri}: run {run_id} has no model at {path!r}")
    artifact_uri = str(logged.artifact_location).rstrip("/") + (f"/{sub}" if sub else "")
    return _download(uri, tracking_uri, artifact_uri, tmp)


def _download(uri: str, tracking_uri: str, artifact_uri: str, tmp: str) -> str:
    from mlflow.artifacts import download_artifacts

    return str(
        call_server(
            uri,
            tracking_uri,
            lambda: download_artifacts(
                artifact_uri=artifact_uri,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
                dst_path=tmp,
            ),
        )
    )
