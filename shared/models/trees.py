"""HistGradientBoosting's trees walked by a compiled loop: the same sums, faster.

scikit-learn's predictor walks one tree over every row before the next tree, copying a
node's whole record (a dozen fields) at every step. ``compiled`` gives a copy of a fitted
``HistGradientBoostingClassifier`` or ``Regressor`` whose raw prediction walks every tree
of a row before the next row, over flat arrays of only the fields a walk reads (feature,
threshold, children, where a missing value goes, leaf value), in a loop compiled by numba.
A row's leaf values are added in the estimator's order, starting from its baseline, so
each sum is the same float; the estimator's own code then turns the sums into
probabilities, classes or values, and validates the input as before.

Numeric splits only: a model with a categorical split (native categorical support) keeps
scikit-learn. Its callers use it only where its answers equal scikit-learn's to the bit
(``shared.models.lookup``).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import numpy as np

__all__ = ["compiled"]

log = logging.getLogger(__name__)


@functools.cache
def _kernel() -> Any:
    """The compiled walk (numba imported and the loop compiled on first use only), kept
    in numba's on-disk cache where one is writable."""
    import numba

    try:
        return numba.njit(nogil=True, cache=True)(_walk)
    except RuntimeError:  # no writable cache directory: compiled in each process
        return numba.njit(nogil=True)(_walk)


def _walk(
    X: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    missing_left: np.ndarray,
    leaf: np.ndarray,
    value: np.ndarray,
    roots: np.ndarray,
    baseline: np.ndarray,
    out: np.ndarray,
) -> None:
    # roots[it * K + k]: the root of iteration it's tree for output k.
    n_outputs = baseline.shape[0]
    n_iterations = roots.shape[0] // n_outputs
    for i in range(X.shape[0]):
        for k in range(n_outputs):
            acc = baseline[k]
            for it in range(n_iterations):
                node = roots[it * n_outputs + k]
                while not leaf[node]:
                    x = X[i, feature[node]]
                    if x <= threshold[node]:
                        node = left[node]
                    elif np.isnan(x):  # as scikit-learn: NaN follows missing_go_to_left
                        node = left[node] if missing_left[node] else right[node]
                    else:
                        node = right[node]
                acc += value[node]
            out[i, k] = acc


class _Forest:
    """Every tree's nodes in one set of flat arrays, children as indices into them."""

    def __init__(self, predictors: list[list[Any]], baseline: np.ndarray) -> None:
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("feature", "threshold", "left", "right", "missing_left", "leaf")
        }
        values, roots, offset = [], [], 0
        for of_iteration in predictors:
            for predictor in of_iteration:
                nodes = predictor.nodes
                roots.append(offset)
                parts["feature"].append(nodes["feature_idx"].astype(np.intp))
                parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
                parts["left"].append(nodes["left"].astype(np.intp) + offset)
                parts["right"].append(nodes["right"].astype(np.intp) + offset)
                parts["missing_left"].append(nodes["missing_go_to_left"].astype(np.bool_))
                parts["leaf"].append(nodes["is_leaf"].astype(np.bool_))
                values.append(nodes["value"].astype(np.float64))
                offset += len(nodes)
        self.arrays = [np.ascontiguousarray(np.concatenate(parts[k])) for k in parts]
        self.value = np.ascontiguousarray(np.concatenate(values))
        self.roots = np.asarray(roots, dtype=np.intp)
        # As scikit-learn starts its sums: zeros plus the baseline.
        self.baseline = np.zeros(baseline.size) + np.asarray(baseline, np.float64).ravel()

    def raw(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], self.baseline.size), dtype=np.float64)
        _kernel()(X, *self.arrays, self.value, self.roots, self.baseline, out)
        return out


def compiled(estimator: Any) -> Any | None:
    """A copy of ``estimator`` that predicts through the compiled walk, or None where it
    does not apply (another estimator, an unfitted one, a categorical split, no numba)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    if not isinstance(estimator, HistGradientBoostingClassifier | HistGradientBoostingRegressor):
        return None
    predictors = getattr(estimator, "_predictors", None)
    baseline = getattr(estimator, "_baseline_prediction", None)
    if not predictors or baseline is None:
        return None
    if any(p.nodes["is_categorical"].any() for of_it in predictors for p in of_it):
        return None
    try:
        forest = _Forest(predictors, np.asarray(baseline))
        forest.raw(np.zeros((1, int(estimator.n_features_in_))))  # compiled here, once
    except Exception as exc:  # numba missing or failing to compile: scikit-learn answers
        log.info("no compiled trees for this model: %s", exc)
        return None
    preprocess = estimator._preprocess_X

    def raw_predict(X: Any, n_threads: int | None = None) -> np.ndarray:
        X = np.ascontiguousarray(preprocess(X, reset=False), dtype=np.float64)
        return forest.raw(X)

    fast = copy.copy(estimator)
    fast._raw_predict = raw_predict  # the instance's, in front of the class's method
    return fast
