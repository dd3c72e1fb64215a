"""Which runtime predicts: onnxruntime only where it gives scikit-learn's answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shared.db import session_scope
from shared.models.encoding import encode_rows
from shared.models.registry import ModelCache, production_versions
from shared.models.runtime import MAX_ABS_DIFF, Output, SklearnRuntime, agrees, validation_sample


def _loaded(name: str):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return ModelCache().get(session, name, production_versions(session)[name])


def _random_rows(schema: dict, n: int, seed: int) -> list[dict]:
    """Valid rows drawn independently of the validation sample."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row: dict = {}
        for f in schema["features"]:
            if f["type"] == "str":
                row[f["name"]] = rng.choice(f["categories"])
            elif f["type"] == "int":
                row[f["name"]] = rng.randint(int(f.get("min", -1000)), int(f.get("max", 1000)))
            else:
                row[f["name"]] = rng.uniform(f.get("min", -1000.0), f.get("max", 1000.0))
        rows.append(row)
    return rows


@pytest.mark.parametrize("name", ["churn", "demand"])
def test_pipelines_that_convert_run_on_onnx_with_scikit_learns_answers(stack, name: str) -> None:  # type: ignore[no-untyped-def]
    model = _loaded(name)
    assert model.runtime == "onnx"
    reference = SklearnRuntime(model.estimator, model.spec).predict
    X = encode_rows(_random_rows(model.schema, 2000, seed=7), model.schema)
    want, want_labels = reference(X)
    got, got_labels = model.predict(X)
    assert float(np.max(np.abs(want - got))) < MAX_ABS_DIFF
    if want_labels is None:
        assert got_labels is None
    else:
        assert np.array_equal(want_labels, got_labels)


def test_the_isolation_forest_stays_on_scikit_learn(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.models.training import train

    with session_scope() as session:
        version = train(session, "anomaly", promote="never")["version"]
        model = ModelCache().get(session, "anomaly", version)
    assert model.runtime == "sklearn"
    X = encode_rows(_random_rows(model.schema, 50, seed=3), model.schema)
    want = -model.estimator.decision_function(X)
    assert np.array_equal(model.predict(X)[0], want)


def test_a_runtime_that_differs_by_more_than_the_tolerance_is_refused(stack) -> None:  # type: ignore[no-untyped-def]
    model = _loaded("churn")
    reference = SklearnRuntime(model.estimator, model.spec)
    sample = validation_sample(model.schema)

    class Candidate:
        name = "candidate"

        def __init__(self, delta: float = 0.0, flip: bool = False) -> None:
            self.delta, self.flip = delta, flip

        def predict(self, X: np.ndarray) -> Output:
            scores, labels = reference.predict(X)
            assert labels is not None
            return Output(scores + self.delta, ~labels if self.flip else labels)

    assert agrees(reference, Candidate(MAX_ABS_DIFF / 10), sample)
    assert not agrees(reference, Candidate(MAX_ABS_DIFF * 10), sample)
    # Same scores, other decisions.
    assert not agrees(reference, Candidate(flip=True), sample)
