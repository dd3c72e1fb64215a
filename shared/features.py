"""The churn feature table: deterministic demo data, and reads through the Redis feature cache."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from redis import Redis
from sqlalchemy import Engine, text

from shared.catalog import CHURN_SCHEMA
from shared.config import get_settings
from shared.metrics import count

__all__ = ["generate_customers", "seed_customers", "load_features", "CUSTOMER_COLUMNS"]

CUSTOMER_COLUMNS = [f["name"] for f in CHURN_SCHEMA["features"]]
_CATS = {f["name"]: f["categories"] for f in CHURN_SCHEMA["features"] if f["type"] == "str"}


def generate_customers(start: int, n: int, *, seed: int = 42) -> dict[str, np.ndarray]:
    """Customers ``start .. start+n-1``: the same ids always get the same rows.

    Churn follows a logistic model of the features (short tenure, many tickets, low usage,
    long absence and monthly contracts raise it), so a classifier has a real signal to learn.
    """
    rng = np.random.default_rng([seed, start])
    ids = np.arange(start, start + n, dtype=np.int64)
    tenure = rng.integers(1, 121, n)
    contract = rng.choice(3, n, p=[0.55, 0.35, 0.10])
    tier = rng.choice(3, n, p=[0.5, 0.35, 0.15])
    is_ent = (tier == 2).astype(np.int64) | (rng.random(n) < 0.03)
    spend = np.round(rng.lognormal(4.0 + 0.8 * tier, 0.5, n), 2).clip(0, 100_000)
    tickets = rng.poisson(1.5, n).clip(0, 50)
    usage = rng.beta(2, 2.5, n).round(4)
    last_login = rng.geometric(0.12, n).clip(0, 365) - 1
    integrations = rng.poisson(1 + 2 * tier, n).clip(0, 50)
    logit = (
        0.3
        - 0.025 * tenure
        + 0.35 * tickets
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


def _csv_chunks(total: int, chunk: int, seed: int) -> Iterator[tuple[int, str]]:
    for start in range(1, total + 1, chunk):
        n = min(chunk, total + 1 - start)
        cols = generate_customers(start, n, seed=seed)
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
) -> int:
    """Replace the customers table with ``total`` synthetic customers, written with COPY."""
    cols = ", ".join(["id", *CUSTOMER_COLUMNS, "churned"])
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("TRUNCATE customers")
        for n, data in _csv_chunks(total, chunk, seed):
            cur.copy_expert(
                f"COPY customers ({cols}) FROM STDIN WITH (FORMAT csv)", io.StringIO(data)
            )
            if on_progress:
                on_progress(n)
        cur.execute("ANALYZE customers")
        raw.commit()
    finally:
        raw.close()
    return total


def load_features(
    engine: Engine, redis: Redis, entity_ids: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """Feature rows for ``entity_ids``, from the Redis cache where warm, else Postgres.

    Missing ids are simply absent from the answer. Rows read from Postgres are cached for
    ``INFERQ_FEATURE_CACHE_TTL_S``; a flushed cache only costs a query.
    """
    settings = get_settings()
    keys = [settings.key("feat", "customers", i) for i in entity_ids]
    found: dict[int, dict[str, Any]] = {}
    missing: list[int] = []
    for eid, raw in zip(entity_ids, redis.mget(keys), strict=True):
        if raw is None:
            missing.append(eid)
        else:
            found[eid] = json.loads(raw)
    pipe = redis.pipeline(transaction=False)
    count(pipe, "cache", "features", "hit", by=len(found))
    count(pipe, "cache", "features", "miss", by=len(missing))
    if missing:
        sql = text(f"SELECT id, {', '.join(CUSTOMER_COLUMNS)} FROM customers WHERE id = ANY(:ids)")
        with engine.connect() as conn:
            rows = conn.execute(sql, {"ids": list(missing)}).mappings().all()
        for r in rows:
            feats = {c: r[c] for c in CUSTOMER_COLUMNS}
            found[r["id"]] = feats
            pipe.set(
                settings.key("feat", "customers", r["id"]),
                json.dumps(feats),
                ex=settings.feature_cache_ttl_s,
            )
    pipe.execute()
    return found
