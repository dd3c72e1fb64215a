"""The API process's memory of recent jobs stays within its budget; its listener hears every
kind of done message."""

from __future__ import annotations

from api.waiter import _Recent


def test_recent_keeps_between_one_and_two_budgets_of_the_newest() -> None:
    recent: _Recent[str] = _Recent(100)
    for i in range(250):
        recent[f"job-{i}"] = f"tenant-{i}"
    remembered = [i for i in range(250) if recent.get(f"job-{i}") is not None]
    assert remembered == list(range(100, 250))  # the last full generation and the current one
    assert recent.get("job-249") == "tenant-249"


def test_recent_bounds_bytes_not_entries_when_given_a_cost() -> None:
    recent: _Recent[bytes] = _Recent(1000, cost=len)
    for i in range(10):
        recent[f"small-{i}"] = b"x" * 10
    recent["big"] = b"y" * 900  # fills the generation: the next one starts a new one
    recent["next"] = b"z" * 200
    assert recent.get("big") == b"y" * 900
    assert recent.get("small-0") == b"x" * 10  # still in the older generation
    for i in range(3):
        recent[f"more-{i}"] = b"w" * 400  # a third generation: the first one is forgotten
    assert recent.get("small-0") is None and recent.get("big") is None
    assert recent.get("more-2") == b"w" * 400


def test_a_long_poll_wakes_on_a_batch_and_on_a_message_of_an_earlier_version() -> None:
    """Workers publish a batch per message on DONE_CHANNEL; a worker not yet upgraded
    publishes one job per message on LEGACY_DONE_CHANNEL, which the API still hears."""
    import asyncio
    import contextlib
    import uuid

    from redis.asyncio import Redis

    from api.waiter import Waiter
    from shared.config import get_settings
    from shared.jobs.fields import DONE_CHANNEL, LEGACY_DONE_CHANNEL, done_message, done_messages

    async def scenario() -> list[bytes | bool]:
        settings = get_settings()
        redis = Redis.from_url(settings.redis_url)
        waiter = Waiter()
        ids = [uuid.uuid4() for _ in range(3)]
        docs = [f'{{"n": {i}}}' for i in range(3)]
        try:
            with contextlib.ExitStack() as watching:
                ended = [watching.enter_context(waiter.watch(str(i))) for i in ids]
                waiter.start(redis)
                legacy = settings.key(LEGACY_DONE_CHANNEL)
                async with asyncio.timeout(10):  # until the listener has subscribed
                    while await redis.pubsub_numsub(legacy) == [(legacy.encode(), 0)]:
                        await asyncio.sleep(0.01)
                for message in done_messages(zip(ids[:2], docs[:2], strict=True)):
                    await redis.publish(settings.key(DONE_CHANNEL), message)
                await redis.publish(legacy, done_message(ids[2], docs[2]))
                return [await e(5) for e in ended]
        finally:
            await waiter.stop()
            await redis.aclose()

    assert asyncio.run(scenario()) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
