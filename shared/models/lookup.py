"""A DataFrame pipeline run from its codes, with the answers of the pipeline itself.

The pipelines data teams bring start with a ``ColumnTransformer`` that one-hot (or
ordinal) encodes string columns and passes numbers through. On a DataFrame, scikit-learn
spends most of a small batch's time in pandas and in comparing Python strings, and a
quarter of a large batch's. Yet a transformer of string columns is a function of a row's
categories alone, and those are few: ``LookupRuntime`` asks each such transformer once,
at load, for its output on every combination of its columns' categories (and a missing
value), and then looks a batch's rows up in that table by their category codes. Numeric
columns go through their own transformers (or none) as before, the blocks are stacked in
the ``ColumnTransformer``'s order, and the pipeline's remaining steps run on the stacked
matrix unchanged: the same fitted objects on the same numbers.

Its input is the codes matrix (``shared.models.encoding.encode_rows``; a score chunk reads
it straight from the database): float64, a string as its index in the schema's
``categories`` (-1 for missing or unknown), a number as itself (NaN for missing). It is
used only if its outputs equal scikit-learn's on the DataFrame, bit for bit, on a
validation sample that spans every category, every numeric range and the missing values a
batch can hold;
anything it does not know (another first step, sparse or pandas output, a transformer
mixing strings and numbers, more than ``MAX_COMBINATIONS`` category combinations) keeps
scikit-learn.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shared.models.encoding import columns_from_codes, model_input
from shared.models.runtime import Kind, Output, SklearnRuntime, validation_sample
from shared.models.trees import compiled

__all__ = ["LookupRuntime", "MAX_COMBINATIONS"]

log = logging.getLogger(__name__)

#: Largest table of one transformer's outputs (rows: combinations of its columns'
#: categories, a missing value included): 65,536 rows of a few dozen floats is a few MB.
MAX_COMBINATIONS = 65_536

#: A block's output for a batch's codes, or None when scikit-learn must answer instead.
Block = Callable[[np.ndarray], "np.ndarray | None"]


def _dense(out: Any) -> np.ndarray:
    return np.asarray(out.toarray() if hasattr(out, "toarray") else out)


def _column_names(ct: Any, cols: Any) -> list[str] | None:
    """The input column names a fitted ``ColumnTransformer`` gives a transformer, or None
    for a selection this runtime does not follow (a single name: the transformer gets a
    Series; a slice; a callable)."""
    if isinstance(cols, str | slice) or callable(cols):
        return None
    names = list(getattr(ct, "feature_names_in_", ()))
    picked = list(cols)
    if all(isinstance(c, str) for c in picked):
        return picked
    if names and all(isinstance(c, bool | np.bool_) for c in picked) and len(picked) == len(names):
        return [n for n, keep in zip(names, picked, strict=True) if keep]
    if names and all(isinstance(c, int | np.integer) for c in picked):
        return [names[int(c)] for c in picked]
    return None


class _Table:
    """One transformer of string columns as a table of its outputs, row ``sum(code_j *
    stride_j)``; each column's last slot is a missing value when ``missing`` is true."""

    def __init__(self, trans: Any, specs: list[dict[str, Any]], cols: list[int]) -> None:
        self.cols = cols
        self.missing = True
        table = self._build(trans, specs, missing=True)
        if table is None:
            self.missing = False
            table = self._build(trans, specs, missing=False)
        if table is None:
            raise ValueError("the transformer does not take every combination of categories")
        self.table: np.ndarray = table
        self.radix = np.array(
            [len(s["categories"]) + (1 if self.missing else 0) for s in specs], dtype=np.int64
        )
        strides = np.ones(len(specs), dtype=np.int64)
        for j in range(len(specs) - 2, -1, -1):
            strides[j] = strides[j + 1] * self.radix[j + 1]
        self.strides = strides

    @staticmethod
    def _build(trans: Any, specs: list[dict[str, Any]], *, missing: bool) -> np.ndarray | None:
        values = [list(s["categories"]) + ([None] if missing else []) for s in specs]
        combos = list(itertools.product(*values))
        columns = {}
        for j, s in enumerate(specs):
            col = np.empty(len(combos), dtype=object)
            col[:] = [c[j] for c in combos]
            columns[s["name"]] = col
        frame = model_input(columns, {"input": "frame", "features": specs})
        try:
            return _dense(trans.transform(frame))
        except Exception:
            return None

    def __call__(self, X: np.ndarray) -> np.ndarray | None:
        codes = X[:, self.cols].astype(np.int64)
        gone = codes < 0
        if gone.any():
            if not self.missing:
                return None  # the transformer refuses a missing value: let it say so
            codes = np.where(gone, self.radix - 1, codes)
        return self.table[codes @ self.strides]


class _Numbers:
    """Numeric columns through their own transformer (an identity one takes the columns)."""

    def __init__(self, trans: Any, specs: list[dict[str, Any]], cols: list[int]) -> None:
        self.trans = None if _identity(trans) else trans
        self.specs = specs
        self.cols = cols

    def __call__(self, X: np.ndarray) -> np.ndarray:
        sub = X[:, self.cols]
        if self.trans is None:
            return sub
        schema = {"input": "frame", "features": self.specs}
        return _dense(self.trans.transform(model_input(columns_from_codes(sub, schema), schema)))


def _identity(trans: Any) -> bool:
    from sklearn.preprocessing import FunctionTransformer

    if isinstance(trans, str):
        return trans == "passthrough"
    return isinstance(trans, FunctionTransformer) and trans.func is None and not trans.validate


class _Tail:
    """The pipeline's steps after its ``ColumnTransformer``, as one estimator."""

    def __init__(self, steps: Sequence[Any]) -> None:
        self.middle = list(steps[:-1])
        self.last = steps[-1]

    def _through(self, Z: np.ndarray) -> Any:
        for step in self.middle:
            Z = step.transform(Z)
        return Z

    def predict_proba(self, Z: np.ndarray) -> Any:
        return self.last.predict_proba(self._through(Z))

    def predict(self, Z: np.ndarray) -> Any:
        return self.last.predict(self._through(Z))

    def decision_function(self, Z: np.ndarray) -> Any:
        return self.last.decision_function(self._through(Z))


class LookupRuntime:
    """See the module doc. ``predict`` takes the codes matrix."""

    name = "sklearn_lookup"

    def __init__(
        self, blocks: list[Block], tail: SklearnRuntime, reference: Callable[[np.ndarray], Output]
    ) -> None:
        self._blocks = blocks
        self._tail = tail
        self._reference = reference
        #: Whether the last step predicts through ``shared.models.trees``' compiled walk.
        self.trees = False

    @classmethod
    def load(
        cls,
        estimator: Any,
        kind: Kind,
        schema: dict[str, Any],
        reference: SklearnRuntime,
        *,
        trees: bool = True,
    ) -> LookupRuntime | None:
        """The runtime if it gives ``reference``'s answers to the bit, else None; with
        ``trees``, its last step's trees compiled where that too gives them."""
        if schema.get("input") != "frame":
            return None
        try:
            blocks = _blocks(estimator, schema)
        except ValueError as exc:
            log.info("no lookup runtime for this pipeline: %s", exc)
            return None
        if blocks is None:
            return None

        def from_frame(X: np.ndarray) -> Output:
            return reference.predict(model_input(columns_from_codes(X, schema), schema))

        steps = [s for _, s in estimator.steps[1:] if s not in (None, "passthrough")]
        # The last step's compiled trees where they give its answers, else the step itself.
        fast = compiled(steps[-1]) if steps and trees else None
        for last in ([fast] if fast is not None else []) + steps[-1:]:
            runtime = cls(blocks, SklearnRuntime(_Tail([*steps[:-1], last]), kind), from_frame)
            try:
                same = all(_same(from_frame, runtime.predict, X) for X in _samples(schema))
            except Exception as exc:
                log.info("the lookup runtime failed on the validation sample: %s", exc)
                return None
            if same:
                runtime.trees = last is fast
                return runtime
            if last is fast:
                log.warning("compiled trees differ from scikit-learn's; keeping its trees")
        log.warning("lookup output differs from scikit-learn's; keeping scikit-learn")
        return None

    def predict(self, X: Any) -> Output:
        X = np.asarray(X, dtype=np.float64)
        parts = []
        for block in self._blocks:
            part = block(X)
            if part is None:
                return self._reference(X)
            parts.append(part)
        return self._tail.predict(np.hstack(parts))


def _blocks(estimator: Any, schema: dict[str, Any]) -> list[Block] | None:
    """The first step's transformers as blocks, or None where this runtime does not apply."""
    from sklearn.compose import ColumnTransformer

    steps = getattr(estimator, "steps", None)
    if not steps or len(steps) < 2 or not isinstance(steps[0][1], ColumnTransformer):
        return None
    ct = steps[0][1]
    if getattr(ct, "sparse_output_", True) or _output(ct) != "default":
        return None  # sparse or DataFrame output: the next step sees something else
    where = {f["name"]: j for j, f in enumerate(schema["features"])}
    blocks: list[Block] = []
    for _name, trans, cols in ct.transformers_:
        if isinstance(trans, str) and trans == "drop":
            continue
        names = _column_names(ct, cols)
        if names is None or any(n not in where for n in names):
            return None
        if not names:
            continue
        specs = [schema["features"][where[n]] for n in names]
        idx = [where[n] for n in names]
        strings = [s["type"] == "str" for s in specs]
        if all(strings):
            if any(not s.get("categories") for s in specs):
                return None
            size = math.prod(len(s["categories"]) + 1 for s in specs)
            if size > MAX_COMBINATIONS or isinstance(trans, str):
                return None
            blocks.append(_Table(trans, specs, idx))
        elif not any(strings):
            blocks.append(_Numbers(trans, specs, idx))
        else:
            return None  # strings and numbers in one transformer
    return blocks or None


def _output(ct: Any) -> str:
    """What the ``ColumnTransformer`` returns for dense output: ``default`` is an array."""
    try:
        from sklearn.utils._set_output import _get_output_config

        return str(_get_output_config("transform", ct)["dense"])
    except Exception:
        return "unknown"


def _samples(schema: dict[str, Any]) -> list[np.ndarray]:
    """The validation sample as codes; then, for the features that can be missing (a
    string: NULL or a value outside the categories in a feature table; a nullable
    number), rows missing one of them each, and rows missing all of them but one."""
    X = validation_sample(schema)
    feats = schema["features"]
    gaps = [
        (j, -1.0 if f["type"] == "str" else math.nan)
        for j, f in enumerate(feats)
        if f["type"] == "str" or f.get("nullable")
    ]
    if not gaps:
        return [X]
    one = X[np.arange(len(gaps)) % len(X)].copy()
    rest = X[np.arange(len(gaps)) % len(X)].copy()
    for i, (j, gap) in enumerate(gaps):
        one[i, j] = gap
        for k, (jj, other) in enumerate(gaps):
            if k != i:
                rest[i, jj] = other
    return [X, one, rest]


def _same(
    want_of: Callable[[np.ndarray], Output], got_of: Callable[[np.ndarray], Output], X: np.ndarray
) -> bool:
    """Whether both give the same answer to the bit (scores, labels, per-class
    probabilities), or both refuse ``X``."""
    try:
        want = want_of(X)
    except Exception:
        try:
            got_of(X)
        except Exception:
            return True
        return False
    got = got_of(X)
    if not np.array_equal(want.scores, got.scores, equal_nan=True):
        return False
    if want.labels is None or got.labels is None:
        if want.labels is not got.labels:
            return False
    elif not np.array_equal(want.labels, got.labels):
        return False
    if want.proba is None or got.proba is None:
        return want.proba is None and got.proba is None
    return bool(np.array_equal(want.proba, got.proba, equal_nan=True))
