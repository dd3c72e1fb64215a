"""A model version's reference profile: what its inputs and scores looked like when it was
trained or registered, stored with the version so live traffic can be compared with it.

Per numeric feature: the inner edges of ``BINS`` quantile bins and the count of reference
rows in each, and a sample of up to ``SAMPLE_MAX`` values (for the two-sample
Kolmogorov-Smirnov test); per categorical feature (strings and booleans): the count of
each category. The scores are profiled as a numeric feature. Missing values are counted
apart and left out of the bins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BINS",
    "SAMPLE_MAX",
    "REFERENCE_ROWS",
    "build_profile",
    "columns_of",
    "is_categorical",
    "numeric_values",
    "category_values",
    "bin_counts",
    "columns_from_codes",
]

BINS = 10
SAMPLE_MAX = 2000
#: Rows a reference profile is built from at most (sampled when there are more).
REFERENCE_ROWS = 5000
MISSING = "(missing)"


def is_categorical(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") in ("str", "bool")


def columns_of(rows: Iterable[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Rows (feature name to value) as one list of values per feature."""
    columns: dict[str, list[Any]] = {n: [] for n in names}
    for row in rows:
        for n in names:
            columns[n].append(row.get(n))
    return columns


def numeric_values(values: Sequence[Any]) -> tuple[np.ndarray, int]:
    """(finite values as float64, how many were missing or not numbers)."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v is not None and not isinstance(v, str) else np.nan
        except (TypeError, ValueError):
            out[i] = np.nan
    finite = out[np.isfinite(out)]
    return finite, len(out) - len(finite)


def category_values(values: Sequence[Any]) -> Counter[str]:
    """Counts per category, booleans as ``true`` / ``false``, missing as ``(missing)``."""
    counts: Counter[str] = Counter()
    for v in values:
        if v is None:
            counts[MISSING] += 1
        elif isinstance(v, bool | np.bool_):
            counts["true" if v else "false"] += 1
        else:
            counts[str(v)] += 1
    return counts


def bin_counts(edges: Sequence[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins (-inf, e1], (e1, e2], ..., (ek, inf)."""
    return np.bincount(
        np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1
    )


def _numeric(values: Sequence[Any], rng: np.random.Generator) -> dict[str, Any]:
    finite, missing = numeric_values(values)
    if not len(finite):
        return {"kind": "numeric", "rows": 0, "missing": missing, "edges": [], "counts": [0]}
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, BINS + 1)))[1:-1]
    sample = finite if len(finite) <= SAMPLE_MAX else rng.choice(finite, SAMPLE_MAX, replace=False)
    return {
        "kind": "numeric",
        "rows": int(len(finite)),
        "missing": missing,
        "edges": edges.tolist(),
        "counts": bin_counts(edges, finite).tolist(),
        "sample": np.sort(sample).tolist(),
    }


def _categorical(values: Sequence[Any]) -> dict[str, Any]:
    counts = category_values(values)
    return {"kind": "categorical", "rows": sum(counts.values()), "counts": dict(counts)}


def columns_from_codes(schema: Mapping[str, Any], X: np.ndarray) -> dict[str, list[Any]]:
    """A codes matrix (the built-in models' input) as the values clients send: each string
    feature's code back to its category."""
    columns: dict[str, list[Any]] = {}
    for j, spec in enumerate(schema["features"]):
        col = X[:, j]
        if spec["type"] == "str":
            cats = list(spec["categories"])
            columns[spec["name"]] = [cats[int(c)] if 0 <= c < len(cats) else None for c in col]
        else:
            columns[spec["name"]] = col.tolist()
    return columns


def build_profile(
    schema: Mapping[str, Any],
    columns: Mapping[str, Sequence[Any]],
    scores: Sequence[float] | np.ndarray | None,
    *,
    source: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The profile of ``columns`` (one list of values per feature of ``schema``) and the
    model's ``scores`` on the same rows; ``source`` says where the rows came from."""
    rng = np.random.default_rng(seed)
    rows = max((len(v) for v in columns.values()), default=0)
    features = {}
    for spec in schema["features"]:
        values = columns.get(spec["name"], [])
        features[spec["name"]] = (
            _categorical(values) if is_categorical(spec) else _numeric(values, rng)
        )
    return {
        "rows": rows,
        "source": source,
        "features": features,
        "score": _numeric(list(scores), rng) if scores is not None else None,
    }
