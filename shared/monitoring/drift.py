"""Drift statistics: a window of live inputs and scores against a reference profile.

Per numeric feature, and for the scores:

- **PSI** (population stability index) over the reference's quantile bins:
  ``sum((w - r) * ln(w / r))`` over the bins' shares in the window (w) and the reference
  (r), each share at least ``EPSILON``. Below 0.1 is stable, 0.1 to 0.2 a moderate shift,
  above 0.2 (``INFERQ_DRIFT_PSI_THRESHOLD``) a shift worth acting on.
- **KS**: the two-sample Kolmogorov-Smirnov statistic (the largest gap between the two
  cumulative distributions) and its p-value, ``scipy.stats.ks_2samp``, against the
  reference's sample of values.

Per categorical feature: PSI over the categories (a category the reference never saw has
share ``EPSILON`` there), and the chi-squared test of homogeneity of the two samples'
category counts, ``scipy.stats.chi2_contingency``.

A feature drifts when its PSI reaches the threshold or its p-value is below
``INFERQ_DRIFT_P_VALUE`` divided by the number of tests in the report (Bonferroni: with
ten features, ten chances of a false alarm are cut back to one). A window with fewer
than ``INFERQ_DRIFT_MIN_ROWS`` rows is reported with ``enough_rows`` false and flags
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from shared.monitoring.profile import bin_counts, category_values, is_categorical, numeric_values

__all__ = ["Thresholds", "psi", "compare", "EPSILON"]

#: The smallest share a bin may have in PSI (an empty bin would make it infinite).
EPSILON = 1e-4


@dataclass(frozen=True)
class Thresholds:
    """From the settings (``shared.monitoring.reports.thresholds``)."""

    psi: float
    p_value: float
    min_rows: int


def psi(reference: Sequence[float] | np.ndarray, window: Sequence[float] | np.ndarray) -> float:
    """The PSI of two count vectors over the same bins."""
    r = np.asarray(reference, dtype=np.float64)
    w = np.asarray(window, dtype=np.float64)
    if r.sum() <= 0 or w.sum() <= 0:
        return math.nan
    r = np.clip(r / r.sum(), EPSILON, None)
    w = np.clip(w / w.sum(), EPSILON, None)
    return float(np.sum((w - r) * np.log(w / r)))


def _numeric(ref: Mapping[str, Any], values: Sequence[Any]) -> dict[str, Any]:
    finite, missing = numeric_values(values)
    out: dict[str, Any] = {"kind": "numeric", "rows": int(len(finite)), "missing": missing}
    if not len(finite) or not ref.get("rows"):
        return {**out, "statistic": "ks", "value": None, "p_value": None, "psi": None}
    counts = bin_counts(ref["edges"], finite)
    ks = stats.ks_2samp(np.asarray(ref["sample"]), finite)
    return {
        **out,
        "statistic": "ks",
        "value": float(ks.statistic),
        "p_value": float(ks.pvalue),
        "psi": psi(ref["counts"], counts),
        "mean": float(finite.mean()),
        "reference_mean": float(np.mean(ref["sample"])),
    }


def _categorical(ref: Mapping[str, Any], values: Sequence[Any]) -> dict[str, Any]:
    window = category_values(values)
    out: dict[str, Any] = {"kind": "categorical", "rows": sum(window.values())}
    reference: dict[str, int] = ref.get("counts") or {}
    if not out["rows"] or not reference:
        return {**out, "statistic": "chi2", "value": None, "p_value": None, "psi": None}
    categories = sorted(set(reference) | set(window))
    r = [reference.get(c, 0) for c in categories]
    w = [window.get(c, 0) for c in categories]
    if len(categories) > 1:
        chi2, p, _, _ = stats.chi2_contingency([r, w])
        value, p_value = float(chi2), float(p)
    else:  # one category on both sides: nothing to tell apart
        value, p_value = 0.0, 1.0
    total = sum(w)
    return {
        **out,
        "statistic": "chi2",
        "value": value,
        "p_value": p_value,
        "psi": psi(r, w),
        "shares": {c: round(n / total, 4) for c, n in zip(categories, w, strict=True) if n},
    }


def compare(
    profile: Mapping[str, Any],
    schema: Mapping[str, Any],
    columns: Mapping[str, Sequence[Any]],
    scores: Sequence[float] | np.ndarray,
    thresholds: Thresholds,
) -> dict[str, Any]:
    """The report of one window: per feature and for the scores, the statistics above,
    each with ``drifted``; ``drifted`` overall if any is."""
    rows = len(scores)
    enough = rows >= thresholds.min_rows
    features = []
    for spec in schema["features"]:
        name = spec["name"]
        ref = profile["features"].get(name)
        if ref is None:
            continue
        values = columns.get(name, [])
        result = _categorical(ref, values) if is_categorical(spec) else _numeric(ref, values)
        features.append({"feature": name, **result})
    score = _numeric(profile["score"], list(scores)) if profile.get("score") else None
    tests = sum(1 for f in [*features, score] if f and f.get("p_value") is not None)
    alpha = thresholds.p_value / max(1, tests)
    for f in [*features, *([score] if score else [])]:
        psi_value, p_value = f.get("psi"), f.get("p_value")
        f["drifted"] = bool(
            enough
            and (
                (psi_value is not None and psi_value >= thresholds.psi)
                or (p_value is not None and p_value < alpha)
            )
        )
    return {
        "rows_reference": int(profile.get("rows") or 0),
        "rows_window": rows,
        "enough_rows": enough,
        "alpha": alpha,
        "thresholds": {"psi": thresholds.psi, "p_value": thresholds.p_value},
        "features": features,
        "score": score,
        "drifted": any(f["drifted"] for f in features) or bool(score and score["drifted"]),
    }
