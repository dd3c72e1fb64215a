"""Long-poll support: one Redis subscription per API process wakes every waiting request.

Workers publish a job's id on the done channel when it ends. A request registers its
interest *before* reading the job, so an end that lands between the read and the wait
still wakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator

from redis.asyncio import Redis

from shared.config import get_settings
from shared.jobs import DONE_CHANNEL

__all__ = ["Waiter", "waiter"]

log = logging.getLogger(__name__)


class _Ended(asyncio.Event):
    """Set when the job ends; ``doc`` is its hot copy when the message carried one."""

    doc: bytes | None = None


class Waiter:
    def __init__(self) -> None:
        self._events: dict[str, set[_Ended]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Callable[[float], Awaitable[bytes | bool]]]:
        """Yields ``ended(timeout)``: False if the job did not end within ``timeout`` s,
        else the job's hot copy (JSON bytes) when the done message carried it, else True."""
        event = _Ended()
        self._events[job_id].add(event)

        async def ended(timeout: float) -> bytes | bool:
            try:
                await asyncio.wait_for(event.wait(), timeout)
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
        channel = get_settings().key(DONE_CHANNEL)
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    async for message in pubsub.listen():
                        # "<job id>" or "<job id> <hot copy JSON>" (see shared.jobs.mirror)
                        data: bytes = message["data"]
                        job_id = data[:36].decode()
                        for event in self._events.get(job_id, ()):
                            event.doc = data[37:] or None
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
