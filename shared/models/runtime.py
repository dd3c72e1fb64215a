"""Runtimes: what turns a batch's model input into scores. One interface, two implementations.

A runtime is built once per process and version (``load``) and then called per batch
(``predict``, returning an ``Output``). ``SklearnRuntime`` calls the estimator itself and is
always right by definition. scikit-learn pays about a millisecond of Python overhead per
call whatever the row count; ``OnnxRuntime`` runs the same pipeline converted by skl2onnx in
microseconds, and is used only if its outputs match scikit-learn's on a validation sample
to within ``MAX_ABS_DIFF`` with the same labels; anything else (a converter that does not
know the estimator, a DataFrame input, a mismatch) keeps scikit-learn.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "MAX_ABS_DIFF",
    "Output",
    "Runtime",
    "SklearnRuntime",
    "OnnxRuntime",
    "validation_sample",
    "agrees",
]

log = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-6
#: Rows of the validation sample, drawn deterministically from the schema.
SAMPLE_ROWS = 512


@dataclass
class Output:
    """Predictions for n rows, by kind:

    - binary classifier: ``scores`` the positive-class (``classes[1]``) probability,
      ``labels`` bool, ``score >= threshold``;
    - multi-class classifier: ``proba`` (n, k) per class, ``labels`` the most probable
      class (object array of class values), ``scores`` its probability;
    - regressor: ``scores`` the value, no labels;
    - anomaly detector: ``scores`` the anomaly score (higher is more anomalous), ``labels``
      true for an anomaly.

    Like a ``(scores, labels)`` pair, it unpacks and indexes as one.
    """

    scores: np.ndarray
    labels: np.ndarray | None
    proba: np.ndarray | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.scores, self.labels))

    def __getitem__(self, i: int) -> Any:
        return (self.scores, self.labels)[i]


@dataclass(frozen=True)
class Kind:
    """What a version predicts: ``kind``, the binary decision threshold, the classes."""

    kind: str
    threshold: float | None = None
    classes: tuple[Any, ...] | None = None

    @property
    def multiclass(self) -> bool:
        return self.kind == "classifier" and self.classes is not None and len(self.classes) > 2

    @property
    def cut(self) -> float:
        return 0.5 if self.threshold is None else self.threshold


class Runtime(Protocol):
    """``predict(X)``: the ``Output`` for a batch's model input (see ``shared.models.schema``)."""

    name: str

    def predict(self, X: Any) -> Output: ...


class SklearnRuntime:
    """The estimator itself."""

    name = "sklearn"

    def __init__(self, estimator: Any, kind: Kind) -> None:
        self.estimator = estimator
        self.kind = kind
        self._classes = np.empty(len(kind.classes or ()), dtype=object)
        self._classes[:] = list(kind.classes or ())

    @classmethod
    def load(cls, estimator: Any, kind: Kind) -> SklearnRuntime:
        return cls(estimator, kind)

    def predict(self, X: Any) -> Output:
        k = self.kind
        if k.kind == "classifier":
            proba = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
            if not k.multiclass:
                scores = proba[:, 1]
                return Output(scores, scores >= k.cut)
            top = proba.argmax(axis=1)
            return Output(proba[np.arange(len(top)), top], self._classes[top], proba)
        if k.kind == "regressor":
            return Output(np.asarray(self.estimator.predict(X), dtype=np.float64).ravel(), None)
        raw = np.asarray(self.estimator.decision_function(X), dtype=np.float64)
        return Output(-raw, raw < 0)


class OnnxRuntime:
    """The pipeline converted by skl2onnx, on onnxruntime with one thread."""

    name = "onnx"

    def __init__(self, session: Any, kind: Kind) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.kind = kind

    @classmethod
    def load(
        cls, estimator: Any, kind: Kind, schema: dict[str, Any], reference: Runtime
    ) -> OnnxRuntime | None:
        """The converted runtime if it agrees with ``reference``, else None."""
        if kind.kind not in ("classifier", "regressor") or kind.multiclass:
            return None  # the IsolationForest converter does not run in float64
        mode = schema.get("input")
        strings = any(f["type"] == "str" for f in schema["features"])
        if mode not in ("codes", "array") or (mode == "array" and strings):
            return None  # DataFrames and strings stay on scikit-learn
        try:
            import onnxruntime as ort
            from skl2onnx import to_onnx
        except ImportError:
            return None
        sample = validation_sample(schema)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                last = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
                options = {id(last): {"zipmap": False}} if kind.kind == "classifier" else None
                onx = to_onnx(
                    estimator, sample[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3}
                )
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1  # one thread per worker process, like BLAS
            so.inter_op_num_threads = 1
            session = ort.InferenceSession(
                onx.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            log.info("no ONNX runtime for this pipeline: %s", exc)
            return None
        runtime = cls(session, kind)
        try:
            ok = agrees(reference, runtime, sample)
        except Exception as exc:
            log.info("the ONNX runtime failed on the validation sample: %s", exc)
            return None
        return runtime if ok else None

    def predict(self, X: Any) -> Output:
        out = self._session.run(None, {self._input: np.ascontiguousarray(X, dtype=np.float64)})
        if self.kind.kind == "classifier":
            scores = np.asarray(out[1][:, 1], dtype=np.float64)
            return Output(scores, scores >= self.kind.cut)
        return Output(np.asarray(out[0], dtype=np.float64).ravel(), None)


def validation_sample(schema: dict[str, Any], n: int = SAMPLE_ROWS) -> np.ndarray:
    """Valid encoded rows spanning every numeric feature's range and every category."""
    rng = np.random.default_rng(20260101)
    cols = []
    for f in schema["features"]:
        if f["type"] == "str":
            cols.append(rng.integers(0, len(f["categories"]), n).astype(np.float64))
            continue
        if f["type"] == "bool":
            cols.append(rng.integers(0, 2, n).astype(np.float64))
            continue
        lo = f.get("min", -1e3)
        hi = f.get("max", 1e3)
        col = rng.uniform(lo, hi, n)
        cols.append(np.round(col) if f["type"] == "int" else col)
    return np.column_stack(cols).astype(np.float64)


def agrees(reference: Runtime, candidate: Runtime, sample: Any) -> bool:
    """Whether ``candidate`` gives ``reference``'s scores (within ``MAX_ABS_DIFF``) and the
    same labels on ``sample``."""
    want, got = reference.predict(sample), candidate.predict(sample)
    diff = float(np.max(np.abs(want.scores - got.scores)))
    if want.labels is None or got.labels is None:
        same_labels = want.labels is None and got.labels is None
    else:
        same_labels = bool(np.array_equal(want.labels, got.labels))
    if not (diff < MAX_ABS_DIFF and same_labels):
        log.warning(
            "ONNX output differs from scikit-learn (max abs diff %.3g, labels %s); "
            "keeping scikit-learn",
            diff,
            "equal" if same_labels else "differ",
        )
        return False
    return True
