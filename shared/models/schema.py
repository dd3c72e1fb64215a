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
row; errors use FastAPI's ``detail`` shape so clients parse one format. A batch's model
input is built by ``shared.models.encoding``; ``shared.models.schema_infer`` derives a
schema from a fitted estimator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shared.jsonsafe import text_problem

__all__ = [
    "TYPES",
    "INPUTS",
    "SchemaError",
    "check_value",
    "validate_rows",
    "normalise",
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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
