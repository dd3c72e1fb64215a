"""Per-key token buckets in Redis, shared by every API process, taken in leases.

The bucket lives in Redis (one atomic script call refills it and takes from it), so every
API process on every host draws on the same tokens. A process does not ask for one token
per request: it takes a *lease* of up to ``LEASE_S`` seconds of the key's rate (never more
than a tenth of its burst) and spends it locally, asking again when it runs out. A key at
2,000 requests/s costs about 20 script calls a second per process instead of 2,000; a key
at a few requests/s still takes its tokens one at a time, as before.

A lease's unspent tokens lapse after ``LEASE_S``: a process can never hold tokens for
later, so a key is never let through faster than its rate and burst allow (a lapsed
token is at worst one the key did not get to use).
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

__all__ = ["TokenBucket", "LEASE_S"]

#: A lease covers at most this many seconds of a key's rate, and lapses after as long.
LEASE_S = 0.05

# KEYS[1] bucket; ARGV: rate/s, burst, now (s), tokens wanted.
# Returns {tokens granted (0 = refused), seconds until a token}.
_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = 0
local wait = 0
if tokens >= 1 then
  granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {granted, tostring(wait)}
"""


class TokenBucket:
    """``await allow(key, rate, burst)`` → (allowed, retry_after_s). A flushed Redis refills."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_SCRIPT)
        self._leases: dict[str, tuple[int, float]] = {}  # key -> (tokens left, lapses at)
        self._pending: dict[str, asyncio.Future[tuple[int, float] | None]] = {}

    @staticmethod
    def lease_size(rate: float, burst: int) -> int:
        """Tokens one script call asks for: ``LEASE_S`` of the rate, at most a tenth of the
        burst, at least one."""
        return max(1, min(int(rate * LEASE_S), burst // 10))

    async def allow(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        while True:
            left, lapses = self._leases.get(key, (0, 0.0))
            if left > 0 and time.monotonic() < lapses:
                self._leases[key] = (left - 1, lapses)
                return True, 0.0
            pending = self._pending.get(key)
            if pending is None:
                break
            # One lease asked for at a time per key: requests arriving meanwhile wait for
            # it instead of each drawing a lease of their own (which would drain the
            # bucket in leases that lapse unspent).
            outcome = await asyncio.shield(pending)
            if outcome is not None and outcome[0] <= 0:
                return False, outcome[1]
        fut: asyncio.Future[tuple[int, float] | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            granted, wait = await self._script(
                keys=[key], args=[rate, burst, time.time(), self.lease_size(rate, burst)]
            )
        except BaseException:
            fut.set_result(None)  # the waiters ask for themselves
            raise
        finally:
            self._pending.pop(key, None)
        granted, wait = int(granted), float(wait)
        if granted > 1:
            self._leases[key] = (granted - 1, time.monotonic() + LEASE_S)
        else:
            self._leases.pop(key, None)
        fut.set_result((granted, wait))
        if len(self._leases) > 10_000:  # many keys: forget the lapsed leases
            now = time.monotonic()
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        return (True, 0.0) if granted > 0 else (False, wait)
