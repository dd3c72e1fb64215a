"""Input schemas: what a model version takes, checked per row and field, built per batch.

A schema is the JSON stored with each model version::

    {"features": [{"name": "tenure_months", "type": "int", "min": 1, "max": 120},
                  {"name": "plan", "type": "str", "categories": ["a", "b"], "dtype": "str"}],
     "input": "frame", "feature_table": "customers", "key": "id"}

- ``type`` is ``int``, ``float``, ``bool`` or ``str``; ``min`` / ``max`` bound numbers
  (inclusive), ``categories`` lists the allowed strings, ``nullable`` admits ``null``
  (a missing value, NaN for the model); ``dtype`` is the pandas dtype the model was fitted on.
- ``input`` says what the estimator is given for a batch: ``frame``, one pandas DataFrame
  with the feature names as columns and their fitted dtypes (pipelines fitted on
  DataFrames); ``array``, a numpy array in feature order (float64, or object where a
  feature is a string); ``codes``, a float64 matrix whose string features are the index of
  the value in ``categories`` (the built-in pipelines: no pandas and no strings on the hot
  path, and onnxruntime can run them).
- ``feature_table`` / ``key``: the table ``entity_ids`` and score jobs read, and its integer
  key column.

Validation runs in the API, once per row and field, without building a pydantic model per
row; errors use FastAPI's ``detail`` shape so clients parse one format. ``infer`` derives a
schema from a fitted estimator (``feature_names_in_``, fitted encoders' ``categories_``), a
sample of rows and an MLflow signature, and says which feature needs declaring when it
cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from shared.jsonsafe import text_problem

__all__ = [
    "TYPES",
    "INPUTS",
    "SchemaError",
    "check_value",
    "validate_rows",
    "encode_rows",
    "columns_from_rows",
    "model_input",
    "rows_input",
    "normalise",
    "infer",
    "row_key",
    "MAX_REPORTED_ERRORS",
]

#: A 10,000-row body with a bad column would otherwise answer 10,000 errors.
MAX_REPORTED_ERRORS = 50
TYPES = ("int", "float", "bool", "str")
INPUTS = ("frame", "array", "codes")

Error = dict[str, Any]


class SchemaError(ValueError):
    """A schema that cannot be used or inferred; ``errors`` name the feature and the fix."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors  # (where, message)
        super().__init__("; ".join(f"{w}: {m}" if w else m for w, m in errors))


def check_value(value: Any, spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """(error type, message) for a bad value, or None. Bounds are inclusive."""
    if value is None:
        return None if spec.get("nullable") else ("missing", "Input should not be null")
    kind = spec["type"]
    if kind == "str":
        if not isinstance(value, str):
            return "string_type", "Input should be a valid string"
        bad = text_problem(value)
        if bad is not None:
            return "string_unicode", bad
        cats = spec.get("categories")
        if cats is not None and value not in cats:
            return "enum", "Unknown category {!r}; expected one of {}".format(
                value, ", ".join(map(repr, cats))
            )
        return None
    if kind == "bool":
        return None if isinstance(value, bool) else ("bool_type", "Input should be true or false")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{kind}_type", f"Input should be a valid {'integer' if kind == 'int' else 'number'}"
    if isinstance(value, float) and not math.isfinite(value):
        return "finite_number", "Input should be a finite number, not NaN or Infinity"
    if kind == "int" and isinstance(value, float) and not value.is_integer():
        return "int_from_float", "Input should be a valid integer, got a number with a fraction"
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None and value < lo:
        return "greater_than_equal", f"Input should be greater than or equal to {lo}"
    if hi is not None and value > hi:
        return "less_than_equal", f"Input should be less than or equal to {hi}"
    return None


def row_json_schema(schema: Mapping[str, Any], *, title: str = "") -> dict[str, Any]:
    """A JSON Schema (2020-12) of one input row, as ``validate_rows`` checks it: every
    feature required, nothing else allowed, types, bounds, categories, nullability."""
    kinds = {"float": "number", "int": "integer", "str": "string", "bool": "boolean"}
    properties: dict[str, Any] = {}
    for f in schema["features"]:
        prop: dict[str, Any] = {"type": kinds.get(f["type"], "number")}
        if f.get("categories") is not None:
            prop["enum"] = list(f["categories"])
        if f.get("min") is not None:
            prop["minimum"] = f["min"]
        if f.get("max") is not None:
            prop["maximum"] = f["max"]
        if f.get("nullable"):
            prop["type"] = [prop["type"], "null"]
            if "enum" in prop:
                prop["enum"] = [*prop["enum"], None]
        if f.get("description"):
            prop["description"] = f["description"]
        properties[f["name"]] = prop
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if title:
        out["title"] = title
    return out


def validate_rows(
    rows: Sequence[Any], schema: Mapping[str, Any], *, loc: tuple[Any, ...] = ("body", "inputs")
) -> list[Error]:
    """Every problem with ``rows``, each naming the row index and the field."""
    specs = {f["name"]: f for f in schema["features"]}
    expected = set(specs)
    errors: list[Error] = []

    def add(kind: str, where: tuple[Any, ...], msg: str, value: Any = None) -> bool:
        errors.append({"type": kind, "loc": [*loc, *where], "msg": msg, "input": value})
        return len(errors) >= MAX_REPORTED_ERRORS

    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            if add("dict_type", (i,), "Each input row should be an object of features", row):
                break
            continue
        keys = row.keys()
        if keys != expected:
            for name in specs:
                if name not in row and add("missing", (i, name), "Field required"):
                    return errors
            for name in keys - expected:
                if add("extra_forbidden", (i, name), "Extra inputs are not permitted", row[name]):
                    return errors
        for name, value in row.items():
            spec = specs.get(name)
            if spec is None:
                continue
            problem = check_value(value, spec)
            if problem is not None and add(problem[0], (i, name), problem[1], _jsonable(value)):
                return errors
    return errors


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def encode_rows(rows: Iterable[Mapping[str, Any]], schema: Mapping[str, Any]) -> np.ndarray:
    """Validated rows to the ``codes`` matrix: float64, one column per feature in schema
    order, a string as its index in ``categories``, null as NaN. A string outside the
    categories (a row that skipped validation) is a ``KeyError``."""
    rows = list(rows)
    out = np.empty((len(rows), len(schema["features"])), dtype=np.float64)
    for j, spec in enumerate(schema["features"]):
        name = spec["name"]
        if spec["type"] == "str":
            index = {c: k for k, c in enumerate(spec["categories"])}
            out[:, j] = [index[r[name]] for r in rows]
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


# --- declared schemas ---------------------------------------------------------------------


def normalise(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A declared schema checked and in canonical form; ``SchemaError`` names what is wrong."""
    errors: list[tuple[str, str]] = []
    feats = schema.get("features")
    if not isinstance(feats, list) or not feats:
        raise SchemaError([("features", "give a non-empty list of features")])
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, f in enumerate(feats):
        where = f"features[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            errors.append((where, "each feature is an object with a 'name'"))
            continue
        name = f["name"]
        where = f"feature {name!r}"
        if name in seen:
            errors.append((where, "declared twice"))
        seen.add(name)
        unknown = set(f) - {"name", "type", "min", "max", "categories", "nullable", "dtype"}
        if unknown:
            errors.append((where, f"unknown keys {sorted(unknown)}"))
        kind = f.get("type")
        if kind not in TYPES:
            errors.append((where, f"'type' must be one of {', '.join(TYPES)}, not {kind!r}"))
            continue
        spec: dict[str, Any] = {"name": name, "type": kind}
        for bound in ("min", "max"):
            value = f.get(bound)
            if value is None:
                continue
            if kind not in ("int", "float") or isinstance(value, bool):
                errors.append((where, f"'{bound}' applies to int and float features only"))
            elif not isinstance(value, int | float) or not math.isfinite(value):
                errors.append((where, f"'{bound}' must be a finite number"))
            else:
                spec[bound] = value
        if "min" in spec and "max" in spec and spec["min"] > spec["max"]:
            errors.append((where, "'min' is above 'max'"))
        cats = f.get("categories")
        if cats is not None:
            if kind != "str":
                errors.append((where, "'categories' applies to str features only"))
            elif (
                not isinstance(cats, list) or not cats or not all(isinstance(c, str) for c in cats)
            ):
                errors.append((where, "'categories' must be a non-empty list of strings"))
            else:
                spec["categories"] = list(dict.fromkeys(cats))
        if f.get("nullable"):
            spec["nullable"] = True
        if f.get("dtype") is not None:
            spec["dtype"] = str(f["dtype"])
        out.append(spec)
    mode = schema.get("input", "array")
    if mode not in INPUTS:
        errors.append(("input", f"must be one of {', '.join(INPUTS)}, not {mode!r}"))
    if mode == "codes":
        for spec in out:
            if spec["type"] == "str" and "categories" not in spec:
                errors.append((f"feature {spec['name']!r}", "'codes' input needs categories"))
    if errors:
        raise SchemaError(errors)
    result: dict[str, Any] = {"features": out, "input": mode}
    for extra in ("feature_table", "key", "tenant_column"):
        if schema.get(extra) is not None:
            result[extra] = schema[extra]
    return result


# --- inference from a fitted estimator -----------------------------------------------------

#: MLflow signature column types → ours.
_MLFLOW_TYPES = {
    "long": "int",
    "integer": "int",
    "double": "float",
    "float": "float",
    "boolean": "bool",
    "string": "str",
}


def _type_of(dtype: Any) -> str | None:
    if isinstance(dtype, pd.CategoricalDtype):
        return "str"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype):
        return "str"
    return None


def _encoders(est: Any, columns: list[Any]) -> Iterable[tuple[list[Any], Any]]:
    """(input columns, fitted encoder) for every encoder with ``categories_`` whose input
    columns can be traced back to the estimator's own input."""
    if hasattr(est, "categories_") and hasattr(est, "transform"):
        yield columns, est
        return
    steps = getattr(est, "steps", None)
    if steps:
        # Only the first step sees the input columns as they are.
        yield from _encoders(steps[0][1], columns)
        return
    fitted = getattr(est, "transformers_", None)
    if fitted is not None:
        indices = getattr(est, "_transformer_to_input_indices", {})
        for name, trans, _cols in fitted:
            if name in indices and not isinstance(trans, str):
                sub = [columns[k] for k in indices[name] if k < len(columns)]
                yield from _encoders(trans, sub)


def _categories(estimator: Any, names: list[str]) -> dict[str, tuple[list[Any], bool]]:
    """feature → (fitted categories, whether the encoder saw missing values)."""
    found: dict[str, tuple[list[Any], bool]] = {}
    for cols, enc in _encoders(estimator, list(names)):
        cats = getattr(enc, "categories_", None)
        if cats is None or len(cats) != len(cols):
            continue
        for col, values in zip(cols, cats, strict=True):
            kept = [
                v
                for v in values.tolist()
                if not (v is None or (isinstance(v, float) and math.isnan(v)))
            ]
            found[str(col)] = (kept, len(kept) < len(values))
    return found


def infer(
    estimator: Any,
    *,
    declared: Mapping[str, Any] | None = None,
    sample: pd.DataFrame | None = None,
    signature: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The input schema of a fitted estimator; ``SchemaError`` says what to declare.

    Names come from ``feature_names_in_`` (else the sample's or signature's columns),
    types from the sample's dtypes or the signature, categories from fitted encoders. A
    declared schema wins, but must name the features the estimator was fitted on.
    """
    fitted_names = getattr(estimator, "feature_names_in_", None)
    names = [str(n) for n in fitted_names] if fitted_names is not None else None
    n_in = getattr(estimator, "n_features_in_", None)
    mode = "frame" if names is not None else "array"
    if declared is not None:
        schema = normalise({"input": mode, **declared})
        got = [f["name"] for f in schema["features"]]
        if names is not None and got != names:
            missing = [n for n in names if n not in got]
            extra = [n for n in got if n not in names]
            detail = []
            if missing:
                detail.append(f"missing {missing}")
            if extra:
                detail.append(f"not in the model {extra}")
            if not detail:
                detail.append(f"the model's order is {names}")
            raise SchemaError(
                [
                    (
                        "schema",
                        "features disagree with the model's feature_names_in_: "
                        + "; ".join(detail),
                    )
                ]
            )
        if names is None and n_in is not None and len(got) != n_in:
            raise SchemaError([("schema", f"{len(got)} features declared; the model takes {n_in}")])
        return schema
    sig = {c["name"]: c.get("type") for c in signature or [] if c.get("name")}
    if names is None:
        if sample is not None:
            names = [str(c) for c in sample.columns]
        elif sig:
            names = list(sig)
        else:
            raise SchemaError(
                [
                    (
                        "schema",
                        "the model was fitted without feature names: give a sample "
                        "(--sample ROWS.csv) or a schema (--schema) naming its features",
                    )
                ]
            )
        if n_in is not None and len(names) != n_in:
            raise SchemaError(
                [("sample", f"{len(names)} columns given; the model takes {n_in} features")]
            )
    elif sample is not None:
        absent = [n for n in names if n not in sample.columns]
        if absent:
            raise SchemaError([("sample", f"lacks the model's features {absent}")])
    cats = _categories(estimator, names)
    errors: list[tuple[str, str]] = []
    features: list[dict[str, Any]] = []
    for name in names:
        spec: dict[str, Any] = {"name": name}
        kind: str | None = None
        if sample is not None:
            dtype = sample[name].dtype
            kind = _type_of(dtype)
            spec["dtype"] = str(dtype)
            if sample[name].isna().any():
                spec["nullable"] = True
            if kind == "int" and spec.get("nullable"):
                kind = "float"
        elif name in sig:
            kind = _MLFLOW_TYPES.get(str(sig[name]))
        if name in cats:
            values, saw_missing = cats[name]
            if all(isinstance(v, str) for v in values):
                kind = kind or "str"
                if kind == "str":
                    spec["categories"] = values
            if saw_missing:
                spec["nullable"] = True
        if isinstance(spec.get("dtype"), str) and spec["dtype"] == "category" and kind == "str":
            spec.setdefault(
                "categories",
                [str(c) for c in sample[name].cat.categories],  # type: ignore[index]
            )
        if kind is None:
            errors.append(
                (
                    f"feature {name!r}",
                    "type unknown: give a sample (--sample ROWS.csv) or declare it in a "
                    "schema (int, float, bool or str)",
                )
            )
            continue
        spec["type"] = kind
        features.append(spec)
    if errors:
        raise SchemaError(errors)
    return normalise({"features": features, "input": mode})
