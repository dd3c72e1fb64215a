"""Per-key token buckets in Redis: one atomic script call per request."""

from __future__ import annotations

import time

from redis.asyncio import Redis

__all__ = ["TokenBucket"]

# KEYS[1] bucket; ARGV: rate/s, burst, now (s). Returns {allowed, seconds until a token}.
_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


class TokenBucket:
    """``await allow(key, rate, burst)`` → (allowed, retry_after_s). A flushed Redis refills."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_SCRIPT)

    async def allow(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        allowed, wait = await self._script(keys=[key], args=[rate, burst, time.time()])
        return bool(allowed), float(wait)
