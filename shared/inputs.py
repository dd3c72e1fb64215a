"""Input schemas: validating client rows and turning them into arrays.

A schema is the JSON stored with each model version::

    {"features": [{"name": "tenure_months", "type": "int", "min": 1, "max": 120},
                  {"name": "contract_type", "type": "str", "categories": ["monthly", ...]}],
     "entity_table": "customers"}

Validation runs in the API, once per row and field, without building a pydantic model per
row; errors use FastAPI's ``detail`` shape so clients parse one format. Encoding builds one
float64 column per feature (categories become their index in the schema), so pipelines take
plain arrays and no per-row pandas work happens on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["check_value", "validate_rows", "encode_rows", "MAX_REPORTED_ERRORS"]

#: A 10,000-row body with a bad column would otherwise answer 10,000 errors.
MAX_REPORTED_ERRORS = 50

Error = dict[str, Any]


def check_value(value: Any, spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """(error type, message) for a bad value, or None. Bounds are inclusive."""
    kind = spec["type"]
    if kind == "str":
        if not isinstance(value, str):
            return "string_type", "Input should be a valid string"
        cats = spec.get("categories")
        if cats is not None and value not in cats:
            return "enum", "Unknown category {!r}; expected one of {}".format(
                value, ", ".join(map(repr, cats))
            )
        return None
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
    """Validated rows to a float64 matrix, one column per feature in schema order."""
    rows = list(rows)
    out = np.empty((len(rows), len(schema["features"])), dtype=np.float64)
    for j, spec in enumerate(schema["features"]):
        name = spec["name"]
        if spec["type"] == "str":
            index = {c: k for k, c in enumerate(spec["categories"])}
            out[:, j] = [index[r[name]] for r in rows]
        else:
            out[:, j] = [r[name] for r in rows]
    return out
