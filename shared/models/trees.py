"""HistGradientBoosting's trees walked by a compiled loop: the same sums, faster.

scikit-learn's predictor walks one tree over every row before the next tree, copying a
node's whole record (a dozen fields) at every step, and branching on each comparison.
``compiled`` gives a copy of a fitted ``HistGradientBoostingClassifier`` or ``Regressor``
whose raw prediction runs a loop compiled by numba over flat arrays of only the fields a
walk reads (feature, threshold, children, where a missing value goes, leaf value). It
walks ``LANES`` rows down each tree together, a level at a time for as many levels as
the tree is deep, each step choosing the child by index arithmetic rather than a branch
(a leaf is its own child, so a row that reached one stays there): the steps of
different rows overlap instead of waiting on one another's mispredicted branches. A
row's leaf values are added in the estimator's order, starting from its baseline, so each
sum is the same float; the estimator's own code then turns the sums into probabilities,
classes or values, and validates the input as before.

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


#: Rows walked down a tree together (16 was the fastest of 8, 16 and 32 on the
#: development machine: 84 ms for 100,000 rows of the own-model benchmark's pipeline,
#: against 144 ms walking one row at a time and 127 ms for scikit-learn's walk).
LANES = 16


def _walk(
    X: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    child: np.ndarray,
    missing_left: np.ndarray,
    value: np.ndarray,
    roots: np.ndarray,
    depth: np.ndarray,
    baseline: np.ndarray,
    out: np.ndarray,
) -> None:
    # roots[it * K + k], depth[it * K + k]: iteration it's tree for output k. child[2n] is
    # node n's left child, child[2n + 1] its right one; a leaf's are itself.
    n_outputs = baseline.shape[0]
    n_iterations = roots.shape[0] // n_outputs
    node = np.empty(LANES, np.intp)
    acc = np.empty(LANES, np.float64)
    for first in range(0, X.shape[0], LANES):
        m = min(LANES, X.shape[0] - first)
        for k in range(n_outputs):
            for j in range(m):
                acc[j] = baseline[k]
            for it in range(n_iterations):
                tree = it * n_outputs + k
                for j in range(m):
                    node[j] = roots[tree]
                for _ in range(depth[tree]):
                    for j in range(m):
                        n = node[j]
                        x = X[first + j, feature[n]]
                        # As scikit-learn: left if x <= threshold, and NaN follows
                        # missing_go_to_left.
                        go_left = (x <= threshold[n]) | (np.isnan(x) & missing_left[n])
                        node[j] = child[2 * n + 1 - go_left]
                for j in range(m):
                    acc[j] += value[node[j]]
            for j in range(m):
                out[first + j, k] = acc[j]


class _Forest:
    """Every tree's nodes in one set of flat arrays, children as indices into them."""

    def __init__(self, predictors: list[list[Any]], baseline: np.ndarray) -> None:
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("feature", "threshold", "child", "missing_left")
        }
        values, roots, depths, offset = [], [], [], 0
        for of_iteration in predictors:
            for predictor in of_iteration:
                nodes = predictor.nodes
                leaf = nodes["is_leaf"].astype(np.bool_)
                own = np.arange(offset, offset + len(nodes), dtype=np.intp)
                child = np.empty(2 * len(nodes), dtype=np.intp)
                child[0::2] = np.where(leaf, own, nodes["left"].astype(np.intp) + offset)
                child[1::2] = np.where(leaf, own, nodes["right"].astype(np.intp) + offset)
                roots.append(offset)
                depths.append(int(nodes["depth"].max()))
                # A leaf reads feature 0 (any feature would do: both its children are itself).
                parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]).astype(np.intp))
                parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
                parts["child"].append(child)
                parts["missing_left"].append(nodes["missing_go_to_left"].astype(np.bool_))
                values.append(nodes["value"].astype(np.float64))
                offset += len(nodes)
        self.arrays = [np.ascontiguousarray(np.concatenate(parts[k])) for k in parts]
        self.value = np.ascontiguousarray(np.concatenate(values))
        self.roots = np.asarray(roots, dtype=np.intp)
        self.depth = np.asarray(depths, dtype=np.intp)
        # As scikit-learn starts its sums: zeros plus the baseline.
        self.baseline = np.zeros(baseline.size) + np.asarray(baseline, np.float64).ravel()

    def raw(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], self.baseline.size), dtype=np.float64)
        _kernel()(X, *self.arrays, self.value, self.roots, self.depth, self.baseline, out)
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
