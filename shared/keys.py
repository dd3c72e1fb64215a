"""API keys: random, shown once, stored as SHA-256; each belongs to a tenant and has scopes."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.orm import ApiKey

__all__ = [
    "SCOPES",
    "hash_key",
    "generate_key",
    "create_key",
    "ensure_key",
    "lookup",
    "list_keys",
    "revoke_key",
]

SCOPES = ("jobs:write", "jobs:read", "models:admin")


def hash_key(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def generate_key() -> str:
    """32 random bytes, URL-safe, with a prefix that makes leaked keys easy to grep for."""
    return "iq_" + secrets.token_urlsafe(32)


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    scopes = list(dict.fromkeys(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; known: {', '.join(SCOPES)}")
    return scopes


def create_key(
    session: Session,
    *,
    tenant: str,
    scopes: Iterable[str] = ("jobs:write", "jobs:read"),
    name: str = "",
    value: str | None = None,
    rate_limit_per_s: float | None = None,
) -> tuple[ApiKey, str]:
    """A new key; the plain value is returned once and never stored."""
    value = value or generate_key()
    key = ApiKey(
        tenant=tenant,
        name=name,
        key_hash=hash_key(value),
        scopes=_check_scopes(scopes),
        rate_limit_per_s=rate_limit_per_s,
    )
    session.add(key)
    session.flush()
    return key, value


def ensure_key(session: Session, value: str, *, tenant: str = "default") -> ApiKey:
    """Make sure an admin key with this value exists (``INFERQ_BOOTSTRAP_API_KEY``)."""
    existing = lookup(session, value)
    if existing is not None:
        return existing
    key, _ = create_key(session, tenant=tenant, scopes=SCOPES, name="bootstrap", value=value)
    return key


def lookup(session: Session, value: str) -> ApiKey | None:
    return session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(value), ApiKey.revoked_at.is_(None))
    )


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int) -> bool:
    """Revoke an active key; False if there is none with this id."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
