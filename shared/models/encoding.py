"""A batch's model input built from validated rows, as its schema's ``input`` says:
one DataFrame with the fitted dtypes (``frame``), a numpy array (``array``) or a codes
matrix (``codes``); and ``row_key``, a row's identity for the prediction cache."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def encode_rows(rows: Iterable[Mapping[str, Any]], schema: Mapping[str, Any]) -> np.ndarray:
    """Validated rows to the ``codes`` matrix: float64, one column per feature in schema
    order, a string as its index in ``categories`` (-1 for null), other nulls as NaN. A
    string outside the categories (a row that skipped validation) is a ``KeyError``."""
    rows = list(rows)
    out = np.empty((len(rows), len(schema["features"])), dtype=np.float64)
    for j, spec in enumerate(schema["features"]):
        name = spec["name"]
        if spec["type"] == "str":
            index = {c: k for k, c in enumerate(spec["categories"])}
            out[:, j] = [-1 if r[name] is None else index[r[name]] for r in rows]
        elif spec.get("nullable"):
            out[:, j] = [math.nan if r[name] is None else r[name] for r in rows]
        else:
            out[:, j] = [r[name] for r in rows]
    return out


def columns_from_rows(
    rows: Sequence[Mapping[str, Any]], schema: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Validated rows to one array per feature: float64 for numbers (NaN for null), bool,
    or object for strings (None for null)."""
    cols: dict[str, np.ndarray] = {}
    for spec in schema["features"]:
        name = spec["name"]
        values = [r[name] for r in rows]
        if spec["type"] == "str":
            col = np.empty(len(values), dtype=object)
            col[:] = values
        elif spec["type"] == "bool" and not spec.get("nullable"):
            col = np.array(values, dtype=bool)
        else:
            col = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        cols[name] = col
    return cols


def columns_from_codes(X: np.ndarray, schema: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The codes matrix (see ``encode_rows``; -1 is a missing or unknown string) to one
    array per feature, as ``columns_from_rows`` gives them."""
    columns: dict[str, np.ndarray] = {}
    for j, f in enumerate(schema["features"]):
        col = X[:, j]
        if f["type"] == "str":
            cats = np.empty(len(f["categories"]) + 1, dtype=object)
            cats[:-1] = f["categories"]
            cats[-1] = None  # code -1: missing, or a value outside the categories
            columns[f["name"]] = cats[col.astype(np.int64)]
        elif f["type"] == "bool" and not np.isnan(col).any():
            columns[f["name"]] = col != 0
        else:
            columns[f["name"]] = col
    return columns


def _frame_column(col: np.ndarray, spec: Mapping[str, Any]) -> Any:
    """One DataFrame column with the dtype the model was fitted on."""
    dtype = spec.get("dtype")
    kind = spec["type"]
    if dtype == "category":
        return pd.Categorical(col, categories=spec.get("categories"))
    if kind == "str":
        return pd.array(col, dtype=dtype) if dtype not in (None, "object") else col
    if kind == "int" and not np.isnan(col).any():
        return col.astype(dtype or "int64")
    if kind == "bool" and col.dtype == bool:
        return col
    return col if dtype in (None, "float64") else col.astype(dtype)


def model_input(columns: Mapping[str, np.ndarray], schema: Mapping[str, Any]) -> Any:
    """What the estimator is given for these columns (see the module doc on ``input``)."""
    feats = schema["features"]
    mode = schema.get("input", "array")
    if mode == "frame":
        return pd.DataFrame({f["name"]: _frame_column(columns[f["name"]], f) for f in feats})
    if mode == "codes":
        out = np.empty((len(columns[feats[0]["name"]]), len(feats)), dtype=np.float64)
        for j, f in enumerate(feats):
            col = columns[f["name"]]
            if f["type"] == "str":
                index = {c: k for k, c in enumerate(f["categories"])}
                out[:, j] = [index.get(v, -1) for v in col]
            else:
                out[:, j] = col
        return out
    if any(f["type"] == "str" for f in feats):
        return np.column_stack([columns[f["name"]].astype(object) for f in feats])
    return np.column_stack([columns[f["name"]].astype(np.float64) for f in feats])


def rows_input(rows: Sequence[Mapping[str, Any]], schema: Mapping[str, Any]) -> Any:
    """Validated JSON rows as the estimator takes them."""
    if schema.get("input") == "codes":
        return encode_rows(rows, schema)
    return model_input(columns_from_rows(rows, schema), schema)


def row_key(row: Mapping[str, Any], schema: Mapping[str, Any]) -> bytes:
    """A row's values in schema order, normalised (12 and 12.0 are one value), for the
    content-addressed prediction cache."""
    parts = []
    for f in schema["features"]:
        v = row[f["name"]]
        parts.append(repr(float(v)) if f["type"] in ("int", "float") and v is not None else repr(v))
    return "\x1f".join(parts).encode()
