"""A DataFrame pipeline run from its codes: the pipeline's own answers, to the bit, or not
at all."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from shared.models.encoding import encode_rows
from shared.models.registry import LoadedModel, build
from shared.models.schema_infer import infer
from tests.factories import FEATURES, accounts, gbt_pipeline, plain_rows

STRINGS = ["plan", "region"]
NUMBERS = ["age", "income", "tickets"]


def _loaded(pipeline: Any, train: pd.DataFrame, classes: list[Any]) -> LoadedModel:
    schema = infer(pipeline, sample=train[FEATURES].head(200))
    return build(
        "m",
        1,
        kind="classifier",
        estimator=pipeline,
        schema=schema,
        threshold=None,
        classes=classes,
    )


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return accounts(5000)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    frame = accounts(3000, seed=5)[FEATURES].copy()
    frame.loc[frame.index[::7], "plan"] = None  # a NULL in the feature table
    frame.loc[frame.index[::11], "region"] = None
    return frame


def _codes(model: LoadedModel, frame: pd.DataFrame) -> np.ndarray:
    """The codes a score chunk reads for these rows: a NULL string is -1."""
    nulls = frame.astype(object).where(frame.notna(), None)
    return encode_rows(plain_rows(nulls), model.schema)


def test_gradient_boosted_trees_on_strings_give_the_same_bits(train, rows) -> None:
    pipeline = gbt_pipeline(train)
    model = _loaded(pipeline, train, [False, True])
    assert model.runtime == "sklearn_lookup"
    want = pipeline.predict_proba(rows)[:, 1]
    assert np.array_equal(model.predict_codes(_codes(model, rows)).scores, want)
    full = rows.dropna()
    assert np.array_equal(
        model.predict_rows(plain_rows(full)).scores, pipeline.predict_proba(full)[:, 1]
    )
    one = plain_rows(full.head(1))
    assert model.predict_rows(one).scores.tolist() == [pipeline.predict_proba(full.head(1))[0, 1]]


def test_encoders_scalers_a_middle_step_and_many_classes(train, rows) -> None:
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), NUMBERS),
            (
                "cat",
                OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1),
                STRINGS,
            ),
        ],
        remainder="drop",
    )
    pipeline = Pipeline(
        [("pre", pre), ("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]
    )
    pipeline.fit(train[FEATURES], train["plan"])  # three classes
    model = _loaded(pipeline, train, sorted(pipeline.classes_.tolist()))
    assert model.runtime == "sklearn_lookup"
    full = rows.dropna()
    out = model.predict_codes(_codes(model, full))
    assert out.proba is not None
    assert np.array_equal(out.proba, pipeline.predict_proba(full))
    assert out.labels.tolist() == pipeline.predict(full).tolist()


def test_a_missing_string_the_encoder_refuses_is_refused_as_before(train, rows) -> None:
    pre = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="error"), STRINGS)], remainder="passthrough"
    )
    pipeline = Pipeline([("pre", pre), ("gbt", HistGradientBoostingClassifier(max_iter=10))])
    pipeline.fit(train[FEATURES], train["churned"])
    model = _loaded(pipeline, train, [False, True])
    assert model.runtime == "sklearn_lookup"
    full = rows.dropna()
    assert np.array_equal(
        model.predict_codes(_codes(model, full)).scores, pipeline.predict_proba(full)[:, 1]
    )
    with pytest.raises(ValueError, match="unknown categor"):
        model.predict_codes(_codes(model, rows))  # the NULLs: scikit-learn's own error


class BatchCentred(OneHotEncoder):
    """One-hot columns less their mean over the batch: an answer that depends on the batch,
    which no table of single rows can give."""

    def transform(self, X: Any) -> np.ndarray:
        out = np.asarray(super().transform(X).toarray())
        return out - out.mean(axis=0)


@pytest.mark.parametrize(
    "pre",
    [
        ColumnTransformer(
            [("cat", OneHotEncoder(handle_unknown="ignore"), STRINGS)],
            remainder="passthrough",
            sparse_threshold=1.0,
        ),
        ColumnTransformer(
            [("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), STRINGS)],
            remainder="passthrough",
        ).set_output(transform="pandas"),
        ColumnTransformer(
            [("cat", BatchCentred(handle_unknown="ignore"), STRINGS)], remainder="passthrough"
        ),
        ColumnTransformer(
            [
                ("mixed", OneHotEncoder(sparse_output=False), ["plan", "age"]),
                ("num", "passthrough", ["income", "tickets"]),
            ],
        ),
    ],
    ids=["sparse-output", "pandas-output", "not-row-wise", "strings-and-numbers"],
)
def test_what_it_cannot_follow_stays_on_scikit_learn(train, rows, pre, caplog, request) -> None:
    pipeline = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=2000))])
    pipeline.fit(train[FEATURES], train["churned"])
    model = _loaded(pipeline, train, [False, True])
    assert model.runtime == "sklearn"
    if "not-row-wise" in request.node.name:  # built, tried on the sample, and refused
        assert "lookup output differs from scikit-learn's" in caplog.text
    full = rows.dropna()
    assert np.array_equal(
        model.predict_rows(plain_rows(full)).scores, pipeline.predict_proba(full)[:, 1]
    )


def _regressor(model: Any, train: pd.DataFrame) -> LoadedModel:
    schema = infer(model, sample=train[FEATURES].head(200))
    return build(
        "m", 1, kind="regressor", estimator=model, schema=schema, threshold=None, classes=None
    )


def test_gradient_boosted_trees_walk_compiled_to_the_same_bits(train, rows) -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor

    onehot = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), STRINGS)], remainder="passthrough"
    )
    gaps = train.copy()
    gaps.loc[gaps.index[::5], "income"] = np.nan  # missing values in fit: both directions
    binary = gbt_pipeline(gaps)
    many = Pipeline([("pre", onehot), ("gbt", HistGradientBoostingClassifier(max_iter=15))])
    many.fit(gaps[FEATURES], gaps["plan"])  # three classes: three trees an iteration
    reg = Pipeline([("pre", onehot), ("gbt", HistGradientBoostingRegressor(max_iter=20))])
    reg.fit(gaps[FEATURES], gaps["income"].fillna(0) / 1000 + gaps["tickets"])
    probe = rows.dropna().copy()
    probe.loc[probe.index[::3], "income"] = np.nan
    for pipeline, model in [
        (binary, _loaded(binary, gaps, [False, True])),
        (many, _loaded(many, gaps, sorted(many.classes_.tolist()))),
        (reg, _regressor(reg, gaps)),
    ]:
        assert model.runtime == "sklearn_lookup"
        assert model.compiled_trees
        out = model.predict_codes(_codes(model, probe))
        if pipeline is reg:
            assert np.array_equal(out.scores, pipeline.predict(probe))
        elif pipeline is many:
            assert np.array_equal(out.proba, pipeline.predict_proba(probe))
            assert out.labels.tolist() == pipeline.predict(probe).tolist()
        else:
            assert np.array_equal(out.scores, pipeline.predict_proba(probe)[:, 1])


def test_the_compiled_walk_gives_the_same_sums_for_any_number_of_rows_and_stump_trees() -> None:
    """Rows are walked down a tree in groups of ``LANES``: a last group short of it, a
    single row, and trees that are a single leaf give scikit-learn's raw sums too."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from shared.models.trees import LANES, compiled

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 4))
    X[::7, 1] = np.nan
    y = X[:, 0] * 2 + np.nan_to_num(X[:, 1]) + rng.normal(size=400)
    deep = HistGradientBoostingRegressor(max_iter=12).fit(X, y)
    stumps = HistGradientBoostingRegressor(max_iter=3, min_samples_leaf=300).fit(X, y)
    assert all(p.nodes["is_leaf"].all() for it in stumps._predictors for p in it)
    for estimator in (deep, stumps):
        fast = compiled(estimator)
        assert fast is not None
        for n in (1, LANES - 1, LANES, LANES + 1, 3 * LANES + 5):
            assert np.array_equal(fast._raw_predict(X[:n]), estimator._raw_predict(X[:n]))


def test_trees_with_a_categorical_split_keep_scikit_learns_walk(train, rows) -> None:
    ordinal = ColumnTransformer([("cat", OrdinalEncoder(), STRINGS)], remainder="passthrough")
    gbt = HistGradientBoostingClassifier(max_iter=10, categorical_features=[0, 1])
    pipeline = Pipeline([("pre", ordinal), ("gbt", gbt)]).fit(train[FEATURES], train["churned"])
    model = _loaded(pipeline, train, [False, True])
    assert model.runtime == "sklearn_lookup"
    assert not model.compiled_trees
    full = rows.dropna()
    assert np.array_equal(
        model.predict_codes(_codes(model, full)).scores, pipeline.predict_proba(full)[:, 1]
    )


def test_compiled_trees_can_be_turned_off(train, monkeypatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("INFERQ_COMPILED_TREES", "false")
    get_settings.cache_clear()
    try:
        model = _loaded(gbt_pipeline(train), train, [False, True])
    finally:
        monkeypatch.delenv("INFERQ_COMPILED_TREES")
        get_settings.cache_clear()
    assert model.runtime == "sklearn_lookup" and not model.compiled_trees
