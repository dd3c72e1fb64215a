"""Feature tables: a model's own table of entities, checked, read through the Redis cache.

A model version may name a ``feature_table`` and its integer ``key`` column in its input
schema: any table in inferq's database with a column per feature. ``entity_ids`` jobs read
rows from it (through the feature cache) and score jobs scan it. The demo's ``customers``
table (``shared.devstack.demo``) is one such table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from shared import sql
from shared.config import get_settings
from shared.metrics import count
from shared.sql import Statement

__all__ = [
    "FeatureTable",
    "check_table",
    "unknown_entities",
    "load_features",
]

#: Column types a key may have (score jobs cut the key range into chunks).
_INT_TYPES = {"smallint", "integer", "bigint"}
_NUMERIC_TYPES = _INT_TYPES | {"numeric", "real", "double precision"}
_TEXT_TYPES = {"text", "character varying", "character", "USER-DEFINED"}


def quote(name: str) -> str:
    """An SQL identifier, quoted (names come from checked schemas, never from requests)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class FeatureTable:
    """Where a model's entities live: ``table`` keyed by the integer column ``key``."""

    table: str
    key: str
    columns: tuple[str, ...]
    #: The column naming each row's tenant: a tenant reads and scores only its own rows.
    tenant_column: str | None = None

    @classmethod
    def of(cls, schema: Mapping[str, Any]) -> FeatureTable | None:
        table = schema.get("feature_table")
        if not table:
            return None
        return cls(
            table,
            schema.get("key") or "id",
            tuple(f["name"] for f in schema["features"]),
            schema.get("tenant_column"),
        )

    def owned_by(self, tenant: str) -> tuple[str, dict[str, Any]]:
        """The SQL condition (psycopg2 ``%(owner)s`` style) keeping ``tenant``'s rows only."""
        if self.tenant_column is None:
            return "TRUE", {}
        col = quote(self.tenant_column).replace("%", "%%")
        return f"{col} = %(owner)s", {"owner": tenant}

    @property
    def sql_name(self) -> str:
        return ".".join(quote(part) for part in self.table.split("."))

    @property
    def cache_tag(self) -> str:
        """Part of each cached row's key: the table and the columns read from it."""
        digest = hashlib.sha256("\x1f".join(self.columns).encode()).hexdigest()[:12]
        return f"{self.table}:{digest}"


_COLUMNS = Statement(
    "inferq_table_columns",
    ("text", "text"),
    "SELECT column_name, data_type FROM information_schema.columns "
    "WHERE table_name = $1 AND table_schema = COALESCE($2, current_schema())",
    prepare=False,
)


def _by_key(ft: FeatureTable, columns: str) -> Statement:
    """``columns`` of the rows of ``ft`` whose key is in $1 (bigint[]) and, where the
    table has a tenant column, that belong to tenant $2."""
    owned = f"{quote(ft.tenant_column)} = $2" if ft.tenant_column else "TRUE"
    return Statement(
        "inferq_features",
        ("bigint[]", "text"),
        f"SELECT {columns} FROM {ft.sql_name} WHERE {quote(ft.key)} = ANY($1) AND {owned}",
        prepare=False,
    )


def check_table(
    session: Session,
    table: str,
    key: str,
    features: Sequence[Mapping[str, Any]],
    tenant_column: str | None = None,
) -> list[tuple[str, str]]:
    """What keeps ``table`` from being the feature table of a model with ``features``:
    (field, message) pairs naming the table, the key or the feature column."""
    schema_name, _, name = table.rpartition(".")
    rows = sql.run(session.connection(), (_COLUMNS, (name, schema_name or None)))
    types = {c: t for c, t in rows}
    if not types:
        return [("feature_table", f"no table {table!r} in inferq's database")]
    errors = []
    if key not in types:
        errors.append(("key", f"table {table!r} has no column {key!r}"))
    elif types[key] not in _INT_TYPES:
        errors.append(("key", f"key column {key!r} is {types[key]}; it must be an integer"))
    if tenant_column is not None and types.get(tenant_column) not in _TEXT_TYPES:
        errors.append(("tenant_column", f"table {table!r} has no text column {tenant_column!r}"))
    want = {"int": _NUMERIC_TYPES, "float": _NUMERIC_TYPES, "bool": {"boolean"}, "str": _TEXT_TYPES}
    for f in features:
        col = f["name"]
        if col not in types:
            errors.append(("feature_table", f"table {table!r} lacks the feature column {col!r}"))
        elif types[col] not in want[f["type"]]:
            errors.append(
                (
                    "feature_table",
                    f"column {col!r} of {table!r} is {types[col]}, not a {f['type']} column",
                )
            )
    return errors


def unknown_entities(
    session: Session, ft: FeatureTable, ids: Sequence[int], tenant: str
) -> list[tuple[int, int]]:
    """(position, id) of every id ``ft`` has no row of ``tenant``'s for."""
    rows = sql.run(session.connection(), (_by_key(ft, quote(ft.key)), (list(set(ids)), tenant)))
    known = {r[0] for r in rows}
    return [(i, e) for i, e in enumerate(ids) if e not in known]


def load_features(
    engine: Engine,
    redis: Redis,
    ft: FeatureTable,
    entity_ids: Sequence[int],
    *,
    tenant: str,
    stats: Any = None,
) -> dict[int, dict[str, Any]]:
    """``tenant``'s feature rows for ``entity_ids``, from the Redis cache where warm, else
    Postgres (a table with a tenant column gives each tenant its own rows and cache keys).

    Missing ids are simply absent from the answer. Rows read from Postgres are cached for
    ``INFERQ_FEATURE_CACHE_TTL_S``; a flushed (or evicted) cache only costs a query.
    """
    settings = get_settings()
    scope = (ft.cache_tag, tenant) if ft.tenant_column else (ft.cache_tag,)
    keys = [settings.key("feat", *scope, i) for i in entity_ids]
    found: dict[int, dict[str, Any]] = {}
    missing: list[int] = []
    for eid, raw in zip(entity_ids, redis.mget(keys), strict=True):
        if raw is None:
            missing.append(eid)
        else:
            found[eid] = json.loads(raw)
    pipe = redis.pipeline(transaction=False)
    # Counters go with ``stats`` (a pipeline on the main Redis) when the cache is elsewhere.
    counters = pipe if stats is None else stats
    count(counters, "cache", "features", "hit", by=len(found))
    count(counters, "cache", "features", "miss", by=len(missing))
    if missing:
        cols = ", ".join(quote(c) for c in ft.columns)
        read = _by_key(ft, f"{quote(ft.key)}, {cols}")
        with engine.connect() as conn:
            rows = sql.run(conn, (read, (list(missing), tenant)))
        for key, *values in rows:
            feats = {c: _plain(v) for c, v in zip(ft.columns, values, strict=True)}
            found[key] = feats
            pipe.set(
                settings.key("feat", *scope, key),
                json.dumps(feats),
                ex=settings.feature_cache_ttl_s,
            )
    pipe.execute()
    return found


def _plain(value: Any) -> Any:
    """A column value as JSON has it (numeric columns come back as Decimal)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return float(value)
