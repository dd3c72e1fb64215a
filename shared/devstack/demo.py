"""The demo's data: the ``customers`` table the churn model is trained on and scores,
generated deterministically (``inferq seed``), appended to with a shift (``--append``)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
from sqlalchemy import Engine

from shared.models.catalog import CHURN_SCHEMA

CUSTOMER_COLUMNS = [f["name"] for f in CHURN_SCHEMA["features"]]


_CATS = {f["name"]: f["categories"] for f in CHURN_SCHEMA["features"] if f["type"] == "str"}


def generate_customers(
    start: int, n: int, *, seed: int = 42, shift: float = 0.0
) -> dict[str, np.ndarray]:
    """Customers ``start .. start+n-1``: the same ids always get the same rows.

    Churn follows a logistic model of the features (short tenure, many tickets, low usage,
    long absence and monthly contracts raise it), so a classifier has a real signal to learn.
    ``shift`` moves the population (0: none; 1: a clear move): more monthly contracts,
    more tickets, less usage, and support tickets weigh more on churn, as when a product
    change lands; a model trained before it then drifts, and a retrain differs.
    """
    # (shift 0 draws exactly what it always did: the demo's rows and scores stay put)
    rng = np.random.default_rng([seed, start, round(shift * 1000)] if shift else [seed, start])
    ids = np.arange(start, start + n, dtype=np.int64)
    tenure = rng.integers(1, 121, n)
    mix = [0.55, 0.35, 0.10]  # monthly, annual, two-year
    if shift:
        monthly = min(0.9, 0.55 + 0.2 * shift)
        mix = [monthly, 0.35 / 0.45 * (1 - monthly), 0.10 / 0.45 * (1 - monthly)]
    contract = rng.choice(3, n, p=mix)
    tier = rng.choice(3, n, p=[0.5, 0.35, 0.15])
    is_ent = (tier == 2).astype(np.int64) | (rng.random(n) < 0.03)
    spend = np.round(rng.lognormal(4.0 + 0.8 * tier, 0.5, n), 2).clip(0, 100_000)
    tickets = rng.poisson(1.5 + shift, n).clip(0, 50)
    usage = rng.beta(2, 2.5 + 1.5 * shift, n).round(4)
    last_login = rng.geometric(0.12, n).clip(0, 365) - 1
    integrations = rng.poisson(1 + 2 * tier, n).clip(0, 50)
    logit = (
        0.3
        - 0.025 * tenure
        + (0.35 + 0.25 * shift) * tickets
        - 2.5 * usage
        + 0.04 * last_login
        - 0.15 * integrations
        + np.array([1.0, -0.3, -1.2])[contract]
        - 0.3 * is_ent
    )
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))
    return {
        "id": ids,
        "tenure_months": tenure,
        "monthly_spend": spend,
        "support_tickets": tickets,
        "feature_usage_pct": usage,
        "last_login_days_ago": last_login,
        "num_integrations": integrations,
        "contract_type": np.array(_CATS["contract_type"], dtype=object)[contract],
        "plan_tier": np.array(_CATS["plan_tier"], dtype=object)[tier],
        "is_enterprise": is_ent,
        "churned": churned,
    }


def _csv_chunks(
    total: int, chunk: int, seed: int, *, first: int = 1, shift: float = 0.0
) -> Iterator[tuple[int, str]]:
    last = first + total - 1
    for start in range(first, last + 1, chunk):
        n = min(chunk, last + 1 - start)
        cols = generate_customers(start, n, seed=seed, shift=shift)
        buf = io.StringIO()
        names = ["id", *CUSTOMER_COLUMNS, "churned"]
        rows = zip(*(cols[c].tolist() for c in names), strict=True)
        buf.writelines(",".join(map(str, r)) + "\n" for r in rows)
        yield n, buf.getvalue()


def seed_customers(
    engine: Engine,
    total: int,
    *,
    seed: int = 42,
    chunk: int = 100_000,
    on_progress: Callable[[int], None] | None = None,
    append: bool = False,
    shift: float = 0.0,
) -> int:
    """Replace the customers table with ``total`` synthetic customers, written with COPY;
    with ``append``, add them after the last id instead (``shift``: see
    ``generate_customers``). Returns the first new id."""
    cols = ", ".join(["id", *CUSTOMER_COLUMNS, "churned"])
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if append:
            cur.execute("SELECT COALESCE(max(id), 0) + 1 FROM customers")
            first = int(cur.fetchone()[0])  # type: ignore[index]
        else:
            cur.execute("TRUNCATE customers")
            first = 1
        for n, data in _csv_chunks(total, chunk, seed, first=first, shift=shift):
            cur.copy_expert(
                f"COPY customers ({cols}) FROM STDIN WITH (FORMAT csv)", io.StringIO(data)
            )
            if on_progress:
                on_progress(n)
        cur.execute("ANALYZE customers")
        raw.commit()
    finally:
        raw.close()
    return first
