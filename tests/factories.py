"""Models and data a data team would bring: fitted here, registered through the API."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import httpx
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

PLANS = ["basic", "plus", "pro"]
REGIONS = ["north", "south", "east", "west"]


def accounts(n: int, seed: int = 0, start: int = 1) -> pd.DataFrame:
    """A data team's table: integers, floats and string categories, with a label."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n),
            "income": np.round(rng.lognormal(10, 0.5, n), 2),
            "plan": rng.choice(PLANS, n),
            "region": rng.choice(REGIONS, n),
            "tickets": rng.poisson(2, n),
        }
    )
    logit = (
        -1.0
        + 0.03 * (50 - frame["age"])
        + 0.4 * frame["tickets"]
        - 0.8 * (frame["plan"] == "pro")
        + 0.5 * (frame["region"] == "east")
    )
    frame["churned"] = rng.random(n) < 1 / (1 + np.exp(-logit))
    frame.index = pd.RangeIndex(start, start + n, name="id")
    return frame


FEATURES = ["age", "income", "plan", "region", "tickets"]


def gbt_pipeline(train: pd.DataFrame) -> Pipeline:
    """The model data teams bring: one-hot strings, gradient-boosted trees, on a DataFrame."""
    pre = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"])],
        remainder="passthrough",
    )
    model = Pipeline(
        [("pre", pre), ("gbt", HistGradientBoostingClassifier(max_iter=60, random_state=0))]
    )
    return model.fit(train[FEATURES], train["churned"])


def plain_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a client would send them: JSON values, every float bit kept."""
    return [
        {k: (v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()}
        for rec in frame.to_dict("records")
    ]


def skops_bytes(model: Any) -> tuple[bytes, list[str]]:
    import skops.io as sio

    data = sio.dumps(model)
    return data, list(sio.get_untrusted_types(data=data))


def joblib_bytes(obj: Any) -> bytes:
    import joblib

    buf = io.BytesIO()
    joblib.dump(obj, buf)
    return buf.getvalue()


def upload(
    admin: httpx.Client,
    name: str,
    data: bytes | None,
    *,
    filename: str = "model.skops",
    **metadata: Any,
) -> httpx.Response:
    files = {"artifact": (filename, data, "application/octet-stream")} if data is not None else None
    form = {"metadata": json.dumps(metadata)} if metadata else {}
    return admin.post(f"/v1/models/{name}/versions", files=files, data=form)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
