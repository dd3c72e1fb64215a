"""Artifact formats: how a fitted estimator is written to bytes and read back.

- ``skops`` (the safe default): a zip of JSON and arrays that loads without running
  arbitrary code. Types outside skops' trusted set (for example
  ``sklearn.tree._tree.Tree``) are refused unless an admin passes them explicitly; the
  list so approved is recorded with the version and is all a worker ever trusts.
- ``joblib`` / ``pickle``: loading one runs whatever code its author put in it, so only a
  ``models:admin`` key can register one, and its sha256 is recorded so the bytes that
  load are the bytes that were approved.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FORMATS",
    "ArtifactError",
    "detect",
    "untrusted_types",
    "load",
    "dump",
    "check_estimator",
    "detect_kind",
]

FORMATS = ("skops", "joblib", "pickle")
_SUFFIXES = {".skops": "skops", ".joblib": "joblib", ".pkl": "pickle", ".pickle": "pickle"}


class ArtifactError(ValueError):
    """Bytes that are not a usable model: not a known format, truncated, not an estimator."""


def detect(data: bytes, filename: str | None = None) -> str:
    """The artifact's format, from its file name where it has a known suffix, else from
    its first bytes."""
    if filename:
        for suffix, fmt in _SUFFIXES.items():
            if filename.lower().endswith(suffix):
                return fmt
    if data[:4] == b"PK\x03\x04":
        return "skops"
    if data[:1] == b"\x80":
        return "pickle"
    if data[:1] in (b"\x78", b"\x1f", b"\xfd", b"\x04", b"B"):  # zlib, gzip, xz, lz4, bz2
        return "joblib"
    raise ArtifactError(
        "not a model file: expected a .skops, .joblib or .pkl file (or an MLflow model)"
    )


def untrusted_types(data: bytes) -> list[str]:
    """Types in a skops file that skops does not trust by default."""
    import skops.io as sio

    try:
        return list(sio.get_untrusted_types(data=data))
    except Exception as exc:
        raise ArtifactError(f"not a readable skops file: {exc}") from None


def load(data: bytes, fmt: str, trusted: Sequence[str] = ()) -> Any:
    """The object in ``data``; ``ArtifactError`` for anything that does not load."""
    try:
        if fmt == "skops":
            import skops.io as sio

            if not isinstance(data, bytes) or not zipfile.is_zipfile(io.BytesIO(data)):
                raise ArtifactError("not a skops file (a skops file is a zip archive)")
            return sio.loads(data, trusted=list(trusted))
        if fmt in ("joblib", "pickle"):
            import joblib

            return joblib.load(io.BytesIO(data))
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"could not load the artifact as {fmt}: {type(exc).__name__}: {exc}"
        ) from None
    raise ArtifactError(f"unknown artifact format {fmt!r}; known: {', '.join(FORMATS)}")


def dump(estimator: Any) -> tuple[bytes, list[str]]:
    """``estimator`` as a skops file, and the types in it that skops does not trust by
    default (ours to trust: inferq made the file)."""
    import skops.io as sio

    data = sio.dumps(estimator, compression=zipfile.ZIP_DEFLATED)
    return data, untrusted_types(data)


def check_estimator(obj: Any) -> None:
    """``ArtifactError`` unless ``obj`` is a fitted scikit-learn style estimator."""
    if not any(hasattr(obj, m) for m in ("predict", "predict_proba", "decision_function")):
        raise ArtifactError(
            f"the artifact holds a {type(obj).__name__}, not a fitted estimator or pipeline"
        )
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise ArtifactError(f"the {type(obj).__name__} in the artifact is not fitted") from None
    except TypeError:
        pass  # not a scikit-learn estimator: its own predict will tell


def detect_kind(estimator: Any) -> str | None:
    """classifier, regressor or anomaly, by scikit-learn's own helpers; None if none fits."""
    from sklearn.base import is_classifier, is_outlier_detector, is_regressor

    if is_classifier(estimator):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    if is_outlier_detector(estimator):
        return "anomaly"
    return None
