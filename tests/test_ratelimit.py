"""The shared token bucket with leases, against the suite's real Redis: a fast key costs a
script call per lease, not per request, and no number of API processes lets a key through
faster than its rate and burst."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from shared.config import get_settings
from shared.ratelimit import LEASE_S, TokenBucket


def _against_redis(body: Callable[[Redis], Awaitable[None]]) -> None:
    """``body`` on a client of the suite's Redis, in an event loop of its own."""

    async def run() -> None:
        redis = Redis.from_url(get_settings().redis_url)
        try:
            await body(redis)
        finally:
            await redis.aclose()

    asyncio.run(run())


async def _calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


def test_a_fast_key_takes_leases_and_processes_share_one_bucket() -> None:
    async def run(redis: Redis) -> None:
        key = f"iqtest:rate:{uuid.uuid4().hex}"
        rate, burst = 2000.0, 4000
        # Three "API processes": each its own TokenBucket (its own leases).
        buckets = [TokenBucket(redis) for _ in range(3)]
        t0 = time.monotonic()
        assert (await buckets[0].allow(key, rate, burst))[0]  # the script is loaded
        before = await _calls(redis)
        lease = TokenBucket.lease_size(rate, burst)
        # Within the burst: every request allowed, one script call per lease.
        for i in range(3000):
            assert (await buckets[i % 3].allow(key, rate, burst))[0]
        calls = await _calls(redis) - before
        assert calls <= 3000 / lease + 3, calls
        # Past it: never more than the bucket held plus what it refilled meanwhile,
        # whichever process asks.
        allowed = 3001
        for i in range(6000):
            ok, wait = await buckets[i % 3].allow(key, rate, burst)
            allowed += ok
            assert ok or wait > 0
        elapsed = time.monotonic() - t0
        assert allowed <= burst + rate * elapsed + 1
        assert allowed >= burst - 3 * lease  # leases lapse unspent only at the margin

    _against_redis(run)


def test_a_slow_key_is_counted_one_token_at_a_time() -> None:
    async def run(redis: Redis) -> None:
        key = f"iqtest:rate:{uuid.uuid4().hex}"
        bucket = TokenBucket(redis)
        assert TokenBucket.lease_size(5.0, 5) == 1
        results = [await bucket.allow(key, 5.0, 5) for _ in range(8)]
        assert [ok for ok, _ in results] == [True] * 5 + [False] * 3
        assert all(wait > 0 for ok, wait in results if not ok)
        # A leased token not spent within LEASE_S lapses: a process cannot save any up.
        fast = f"iqtest:rate:{uuid.uuid4().hex}"
        assert (await bucket.allow(fast, 2000.0, 100))[0]  # a lease of 10: 9 left here
        await asyncio.sleep(LEASE_S * 2)
        left, lapses = bucket._leases[fast]
        assert left == 9 and lapses < time.monotonic()
        before = await _calls(redis)
        assert (await bucket.allow(fast, 2000.0, 100))[0]
        assert await _calls(redis) == before + 1  # a new lease from Redis
        assert bucket._leases[fast][0] == 9

    _against_redis(run)


def test_concurrent_requests_share_one_lease_request() -> None:
    async def run(redis: Redis) -> None:
        key = f"iqtest:rate:{uuid.uuid4().hex}"
        bucket = TokenBucket(redis)
        await bucket.allow(f"iqtest:rate:{uuid.uuid4().hex}", 1.0, 1)  # script loaded
        before = await _calls(redis)
        # 200 requests at once, a lease of 100: two or three calls, not 200.
        results = await asyncio.gather(*(bucket.allow(key, 2000.0, 4000) for _ in range(200)))
        assert all(ok for ok, _ in results)
        assert await _calls(redis) - before <= 3

    _against_redis(run)
