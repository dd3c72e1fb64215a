"""A schema derived from what a user brings: a fitted estimator (``feature_names_in_``,
fitted encoders' ``categories_``), a sample of rows and an MLflow signature; where it
cannot be derived, the error says which feature needs declaring."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from shared.models.schema import SchemaError, normalise

__all__ = ["infer"]

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
