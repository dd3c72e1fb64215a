"""Per-process worker state: the model cache, a Redis client, and the promotion watcher."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
from functools import lru_cache

from celery.signals import worker_process_init, worker_process_shutdown
from redis import Redis
from threadpoolctl import threadpool_limits

from shared.config import get_settings
from shared.db import relax_commits, session_scope
from shared.models.registry import ModelCache

__all__ = ["models", "redis_client", "cache_client", "worker_name", "heartbeat_key"]

log = logging.getLogger(__name__)

#: One cache per process; versions are immutable so entries never go stale.
models = ModelCache()
_stop = threading.Event()


@lru_cache
def redis_client() -> Redis:
    return Redis.from_url(get_settings().redis_url, socket_connect_timeout=3, socket_timeout=10)


@lru_cache
def cache_client() -> Redis:
    """The Redis of the feature and prediction caches (``INFERQ_CACHE_REDIS_URL``)."""
    s = get_settings()
    if s.cache_redis_url == s.redis_url:
        return redis_client()
    return Redis.from_url(s.cache_redis_url, socket_connect_timeout=3, socket_timeout=10)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat_key(name: str) -> str:
    """The Redis key that says the worker process ``name`` (host:pid) is alive."""
    return get_settings().key("worker", name)


#: What the heartbeat key says: ``loading`` until the first preload of the production
#: versions is done, then ``ready`` (what /readyz waits for).
_state = "loading"


def _report() -> None:
    """This process is alive (the key exists: the sweeper retakes the predict jobs of a
    process whose key has lapsed, three periods without a renewal) and whether it has
    loaded the production versions yet (its value, which /readyz reads)."""
    try:
        s = get_settings()
        ttl = max(1, round(3 * s.worker_heartbeat_s))
        redis_client().set(heartbeat_key(worker_name()), _state, ex=ttl)
    except Exception:
        log.warning("could not report to Redis", exc_info=True)


def _beat_heart() -> None:
    """A thread of its own: a slow model load in the watcher must not look like death."""
    interval = get_settings().worker_heartbeat_s
    while not _stop.wait(interval):
        _report()


def _preload() -> None:
    try:
        with session_scope() as session:
            loaded = models.warm(session)
        if loaded:
            log.info("preloaded production versions %s", loaded)
    except Exception:  # a database blip must not kill the watcher
        log.exception("could not check the registry for promotions")


def _watch_promotions() -> None:
    """Preload every production version at once, then each newly promoted one, so the first
    job on it never pays the load."""
    global _state
    interval = get_settings().model_poll_s
    while True:
        _preload()
        if _state != "ready":
            # The modules and the first models live as long as the process: out of the
            # cyclic collector's way, so a full collection between batches is short.
            # (Versions loaded later are not frozen: an old one must stay collectable.) No
            # gc.collect() first: this thread holds the GIL for it, and a replacement child
            # may already be running jobs.
            gc.freeze()
            _state = "ready"
            _report()
        if _stop.wait(interval):
            return


@worker_process_init.connect
def _init_process(**_: object) -> None:
    # The parent's connections must not be shared with a forked child (relax_commits
    # disposes of them too).
    relax_commits()
    redis_client.cache_clear()
    cache_client.cache_clear()
    threadpool_limits(1)
    _report()
    # Loading happens beside the pool, never in this hook: the pool waits only a few
    # seconds (worker_proc_alive_timeout) for a new child to come up, and a deployment
    # with many models would have its children killed and restarted in a loop.
    threading.Thread(target=_watch_promotions, name="promotion-watcher", daemon=True).start()
    threading.Thread(target=_beat_heart, name="heartbeat", daemon=True).start()


@worker_process_shutdown.connect
def _shutdown_process(**_: object) -> None:
    _stop.set()
    with contextlib.suppress(Exception):
        redis_client().delete(heartbeat_key(worker_name()))
