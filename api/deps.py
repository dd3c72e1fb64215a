"""Request dependencies: a database session, Redis, and the authenticated principal."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from shared import keys
from shared.config import Settings, get_settings
from shared.db import SessionLocal, get_engine, session_scope
from shared.ratelimit import TokenBucket

__all__ = [
    "SessionDep",
    "SettingsDep",
    "RedisDep",
    "Principal",
    "require",
    "authorize",
    "redis_sync",
    "redis_async",
]

log = logging.getLogger(__name__)


def get_session() -> Iterator[Session]:
    get_engine()
    session = SessionLocal()
    try:
        yield session
    finally:
        session.close()


@lru_cache
def redis_sync() -> Redis:
    return Redis.from_url(get_settings().redis_url, socket_connect_timeout=2, socket_timeout=5)


#: Connections the API's event loop keeps to Redis at most. A burst of long-polls waits
#: for a free one instead of opening hundreds at once (a storm of connects timed out
#: under 256 simultaneous requests here, which clients saw as 503s).
ASYNC_REDIS_CONNECTIONS = 64


@lru_cache
def redis_async() -> AsyncRedis:
    pool = BlockingConnectionPool.from_url(
        get_settings().redis_url,
        max_connections=ASYNC_REDIS_CONNECTIONS,
        timeout=10,
        socket_connect_timeout=5,
    )
    return AsyncRedis(connection_pool=pool)


@lru_cache
def _bucket() -> TokenBucket:
    return TokenBucket(redis_async())


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(redis_sync)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's tenant, scopes and rate."""

    key_id: int
    tenant: str
    scopes: frozenset[str]
    rate_limit_per_s: float | None


#: A revoked key stops working within this many seconds.
_KEY_CACHE_S = 10.0
#: Keys remembered at most: a stream of random tokens must not grow the process.
_KEY_CACHE_MAX = 10_000


class KeyCache:
    """Key hash → principal (None for an unknown key), for ``ttl`` seconds, at most ``size``
    entries; the oldest entry goes first."""

    def __init__(self, ttl: float = _KEY_CACHE_S, size: int = _KEY_CACHE_MAX) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        """(found, principal)."""
        entry = self._entries.get(digest)
        if entry is None:
            return False, None
        if entry[1] <= time.monotonic():
            del self._entries[digest]
            return False, None
        return True, entry[0]

    def put(self, digest: str, principal: Principal | None) -> None:
        self._entries[digest] = (principal, time.monotonic() + self.ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


_key_cache = KeyCache()

#: The scheme the OpenAPI document declares, so /docs' Authorize button sends the key.
#: Checking stays ``authorize``'s (one code path, fast path included).
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An inferq API key (`inferq keys create`; `inferq up` prints a dev key).",
)


def _lookup(value: str) -> Principal | None:
    with session_scope() as session:
        row = keys.lookup(session, value)
        if row is None:
            return None
        return Principal(row.id, row.tenant, frozenset(row.scopes), row.rate_limit_per_s)


async def _authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = keys.hash_key(value)
    found, principal = _key_cache.get(digest)
    if not found:
        principal = await run_in_threadpool(_lookup, value)
        _key_cache.put(digest, principal)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


async def _rate_limit(principal: Principal, settings: Settings) -> None:
    rate = principal.rate_limit_per_s
    if rate is None:
        rate = settings.rate_limit_per_s
    if rate <= 0:
        return
    burst = max(1, int(settings.rate_limit_burst if principal.rate_limit_per_s is None else rate))
    try:
        allowed, wait = await _bucket().allow(settings.key("rate", principal.key_id), rate, burst)
    except RedisError:
        # The limiter fails open: Redis being down is answered where it matters (503 on submit).
        log.warning("rate limiter unavailable", exc_info=True)
        return
    if not allowed:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit of {rate:g} requests/s for this key exceeded",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )


async def authorize(request: Request, scope: str) -> Principal:
    """The authenticated, rate-limited principal holding ``scope`` (else 401/403/429)."""
    principal = await _authenticate(request)
    if scope not in principal.scopes:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this key lacks the {scope!r} scope")
    await _rate_limit(principal, get_settings())
    return principal


def require(scope: str):  # type: ignore[no-untyped-def]
    """Dependency: an authenticated, rate-limited principal holding ``scope`` (else 401/403/429).

    Async, so a request whose key is cached reaches its route without a thread hop.
    """

    async def dependency(
        request: Request,
        _: HTTPAuthorizationCredentials | None = Security(BEARER),  # for OpenAPI
    ) -> Principal:
        return await authorize(request, scope)

    return Depends(dependency)
