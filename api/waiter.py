"""Long-poll support: one Redis subscription per API process wakes every waiting request.

Workers publish the ids of the jobs that end (with their hot copies, when small) on the
done channel, one message per batch of jobs that ended together. A request registers its
interest *before* it looks the job up, so an end that lands between the look-up and the
wait still wakes it.

The process also remembers, for a little while, what it has seen: the hot copies that
rode on done messages and the tenants of the jobs it accepted itself. A client that
submits and then long-polls, the common case, is answered from that memory without a
Redis read; anything the memory has lost is looked up as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from redis.asyncio import Redis

from shared.config import get_settings
from shared.jobs.fields import DONE_CHANNEL, LEGACY_DONE_CHANNEL, read_done_messages

__all__ = ["Waiter", "waiter", "RECENT_JOBS", "RECENT_BYTES"]

log = logging.getLogger(__name__)

#: What the process remembers, in two generations each: between one and two budgets of
#: the newest. Accepted jobs: 20,000 ids (about 10 s at 2,000 jobs/s, a few MiB). Hot
#: copies of ended jobs: 16 MiB of them (each at most DONE_PAYLOAD_MAX, 16 KiB), so a
#: stream of big results costs at most 32 MiB, not their count times 16 KiB.
RECENT_JOBS = 20_000
RECENT_BYTES = 16 * 1024 * 1024

V = TypeVar("V")


class _Recent(Generic[V]):
    """A bounded map that forgets its older half at once: O(1), no per-entry bookkeeping.
    ``size`` bounds the sum of ``cost(value)`` in a generation (1 per entry by default)."""

    def __init__(self, size: int, cost: Callable[[V], int] | None = None) -> None:
        self._size = size
        self._cost = cost
        self._used = 0
        self._new: dict[str, V] = {}
        self._old: dict[str, V] = {}

    def __setitem__(self, key: str, value: V) -> None:
        cost = self._cost(value) if self._cost is not None else 1
        if self._used + cost > self._size:
            self._old, self._new, self._used = self._new, {}, 0
        self._new[key] = value
        self._used += cost

    def get(self, key: str) -> V | None:
        value = self._new.get(key)
        return value if value is not None else self._old.get(key)


class _Ended(asyncio.Event):
    """Set when the job ends; ``doc`` is its hot copy when the message carried one."""

    doc: bytes | None = None


class Waiter:
    def __init__(self) -> None:
        self._events: dict[str, set[_Ended]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ended: _Recent[bytes] = _Recent(RECENT_BYTES, cost=len)
        self._accepted: _Recent[str] = _Recent(RECENT_JOBS)

    def accepted(self, job_id: str, tenant: str) -> None:
        """Remember that this process recorded ``job_id`` for ``tenant``."""
        self._accepted[job_id] = tenant

    def recall(self, job_id: str) -> tuple[str | None, bytes | None]:
        """(tenant if this process accepted the job, its hot copy if it was seen ending)."""
        return self._accepted.get(job_id), self._ended.get(job_id)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Callable[[float], Awaitable[bytes | bool]]]:
        """Yields ``ended(timeout)``: False if the job did not end within ``timeout`` s,
        else the job's hot copy (JSON bytes) when the done message carried it, else True."""
        event = _Ended()
        self._events[job_id].add(event)

        async def ended(timeout: float) -> bytes | bool:
            try:
                async with asyncio.timeout(timeout):  # no task of its own, as wait_for makes
                    await event.wait()
            except TimeoutError:
                return False
            return event.doc or True

        try:
            yield ended
        finally:
            waiting = self._events.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[job_id]

    def start(self, redis: Redis) -> None:
        self._task = asyncio.create_task(self._listen(redis), name="inferq-done-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _listen(self, redis: Redis) -> None:
        channels = [get_settings().key(c) for c in (DONE_CHANNEL, LEGACY_DONE_CHANNEL)]
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(*channels)
                    async for message in pubsub.listen():
                        for job_id, doc in read_done_messages(message["data"]):
                            if doc is not None:
                                self._ended[job_id] = doc
                            for event in self._events.get(job_id, ()):
                                event.doc = doc
                                event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis went away: waiting requests time out and read the ledger; retry.
                log.warning("done-channel listener lost Redis (%s); retrying", exc)
                self._wake_all()
                await asyncio.sleep(1.0)

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()


waiter = Waiter()
