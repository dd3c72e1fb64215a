"""Inference runtimes: onnxruntime where a pipeline converts exactly, scikit-learn otherwise.

scikit-learn pays about a millisecond of Python overhead per call whatever the row count;
onnxruntime runs the same converted pipeline in microseconds. A version runs on ONNX only
if its ONNX outputs match scikit-learn's on a validation sample drawn from its input
schema to within ``MAX_ABS_DIFF``; anything else (a converter that does not know the
estimator, a mismatch) keeps scikit-learn. The decision is made once per process and
version, when the version is loaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["MAX_ABS_DIFF", "validation_sample", "sklearn_predictor", "onnx_predictor", "agrees"]

log = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-6
#: Rows of the validation sample, drawn deterministically from the schema.
SAMPLE_ROWS = 512

Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def validation_sample(schema: dict[str, Any], n: int = SAMPLE_ROWS) -> np.ndarray:
    """Valid encoded rows spanning every feature's range and every category."""
    rng = np.random.default_rng(20260101)
    cols = []
    for f in schema["features"]:
        if f["type"] == "str":
            cols.append(rng.integers(0, len(f["categories"]), n).astype(np.float64))
            continue
        lo = f.get("min", -1e3)
        hi = f.get("max", 1e3)
        col = rng.uniform(lo, hi, n)
        cols.append(np.round(col) if f["type"] == "int" else col)
    return np.column_stack(cols).astype(np.float64)


def sklearn_predictor(kind: str, estimator: Any, threshold: float | None) -> Predictor:
    """Scores and labels as ``LoadedModel.predict`` documents them."""
    cut = 0.5 if threshold is None else threshold

    def predict(X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if kind == "classifier":
            scores = estimator.predict_proba(X)[:, 1]
            return scores, scores >= cut
        if kind == "regressor":
            return np.asarray(estimator.predict(X), dtype=np.float64), None
        raw = estimator.decision_function(X)
        return -raw, raw < 0

    return predict


def onnx_predictor(
    kind: str, estimator: Any, threshold: float | None, schema: dict[str, Any]
) -> Predictor | None:
    """An onnxruntime predictor that agrees with scikit-learn, or None."""
    if kind not in ("classifier", "regressor"):
        return None  # the IsolationForest converter does not run in float64
    try:
        import onnxruntime as ort
        from skl2onnx import to_onnx
    except ImportError:
        return None
    sample = validation_sample(schema)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = (
                {id(estimator.steps[-1][1]): {"zipmap": False}} if kind == "classifier" else None
            )
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
    input_name = session.get_inputs()[0].name
    cut = 0.5 if threshold is None else threshold

    def predict(X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = session.run(None, {input_name: np.ascontiguousarray(X, dtype=np.float64)})
        if kind == "classifier":
            scores = np.asarray(out[1][:, 1], dtype=np.float64)
            return scores, scores >= cut
        return np.asarray(out[0], dtype=np.float64).ravel(), None

    return (
        predict if agrees(sklearn_predictor(kind, estimator, threshold), predict, sample) else None
    )


def agrees(reference: Predictor, candidate: Predictor, sample: np.ndarray) -> bool:
    """Whether ``candidate`` gives ``reference``'s scores (within ``MAX_ABS_DIFF``) and the
    same labels on ``sample``."""
    want, want_labels = reference(sample)
    got, got_labels = candidate(sample)
    diff = float(np.max(np.abs(want - got)))
    if want_labels is None or got_labels is None:
        same_labels = want_labels is None and got_labels is None
    else:
        same_labels = bool(np.array_equal(want_labels, got_labels))
    if not (diff < MAX_ABS_DIFF and same_labels):
        log.warning(
            "ONNX output differs from scikit-learn (max abs diff %.3g, labels %s); "
            "keeping scikit-learn",
            diff,
            "equal" if same_labels else "differ",
        )
        return False
    return True
