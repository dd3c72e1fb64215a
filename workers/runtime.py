"""Per-process worker state: the model cache, a Redis client, and the promotion watcher."""

from __future__ import annotations

import contextlib
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

__all__ = ["models", "redis_client", "worker_name"]

log = logging.getLogger(__name__)

#: One cache per process; versions are immutable so entries never go stale.
models = ModelCache()
_stop = threading.Event()


@lru_cache
def redis_client() -> Redis:
    return Redis.from_url(get_settings().redis_url, socket_connect_timeout=3, socket_timeout=10)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _report() -> None:
    """Readiness: /readyz counts these keys to know that some worker is alive."""
    try:
        s = get_settings()
        redis_client().set(s.key("worker", worker_name()), "1", ex=max(30, int(3 * s.model_poll_s)))
    except Exception:
        log.warning("could not report to Redis", exc_info=True)


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
    job on it never pays the load; and renew this process's heartbeat."""
    interval = get_settings().model_poll_s
    while True:
        _preload()
        if _stop.wait(interval):
            return
        _report()


@worker_process_init.connect
def _init_process(**_: object) -> None:
    # The parent's connections must not be shared with a forked child (relax_commits
    # disposes of them too).
    relax_commits()
    redis_client.cache_clear()
    threadpool_limits(1)
    _report()
    # Loading happens beside the pool, never in this hook: the pool waits only a few
    # seconds (worker_proc_alive_timeout) for a new child to come up, and a deployment
    # with many models would have its children killed and restarted in a loop.
    threading.Thread(target=_watch_promotions, name="promotion-watcher", daemon=True).start()


@worker_process_shutdown.connect
def _shutdown_process(**_: object) -> None:
    _stop.set()
    with contextlib.suppress(Exception):
        redis_client().delete(get_settings().key("worker", worker_name()))
