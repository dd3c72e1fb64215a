"""What the API needs of the model registry, cached: versions are immutable, production moves.

The production map is re-read every ``INFERQ_REGISTRY_CACHE_S`` (and at once after a
promotion through this process), so a submit costs no registry query in the common case.
Past half that age, a submit starts the re-read in the background and goes on with the
map it has; only a map older than the whole age is waited for (a process that was quiet
that long), so a steady trickle of jobs never waits for the registry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.db import session_scope
from shared.models import registry

__all__ = ["VersionInfo", "RegistryView", "registry_view"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    kind: str
    schema: dict[str, Any]


class RegistryView:
    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], VersionInfo] = {}
        self._production: dict[str, int] = {}
        self._production_at = 0.0
        self._lock = threading.Lock()
        self._generation = 0  # moved by invalidate: a re-read begun before it is dropped
        self._refreshing = False

    def invalidate(self) -> None:
        self._generation += 1
        self._production_at = 0.0

    def production(self, session: Session) -> dict[str, int]:
        if time.monotonic() - self._production_at > get_settings().registry_cache_s:
            self._read_production(session)
        return self._production

    def _read_production(self, session: Session) -> None:
        with self._lock:
            generation, at = self._generation, time.monotonic()
            production = registry.production_versions(session)
            if generation == self._generation:
                self._production, self._production_at = production, at

    def _refresh_in_background(self) -> None:
        """One re-read at a time, on the event loop's thread pool."""
        if self._refreshing:
            return
        self._refreshing = True

        def refresh() -> None:
            try:
                with session_scope() as session:
                    self._read_production(session)
            except Exception:  # the next submit waits for the read, and says why
                log.warning("could not re-read the production versions", exc_info=True)
            finally:
                self._refreshing = False

        asyncio.get_running_loop().run_in_executor(None, refresh)

    def version(self, session: Session, name: str, version: int) -> VersionInfo | None:
        info = self._versions.get((name, version))
        if info is None:
            mv = registry.get_version(session, name, version)
            if mv is None:
                return None
            info = VersionInfo(mv.name, mv.version, mv.kind, mv.input_schema)
            self._versions[(name, version)] = info
        return info

    def resolve_cached(self, name: str, version: int | None) -> VersionInfo | None:
        """The answer of ``resolve`` from memory alone, or None if it needs the database.
        Called on the event loop: a map past half its age is re-read in the background."""
        if version is None:
            age, ttl = time.monotonic() - self._production_at, get_settings().registry_cache_s
            if age > ttl:
                return None
            if age > ttl / 2:
                self._refresh_in_background()
            version = self._production.get(name)
            if version is None:
                return None
        return self._versions.get((name, version))

    def resolve(
        self, session: Session, name: str, version: int | None
    ) -> VersionInfo | tuple[str, str]:
        """The version a job will run on, or (field, message) saying why there is none."""
        if version is None:
            prod = self.production(session).get(name)
            if prod is None:
                if not registry.list_versions(session, name):
                    return "model", f"unknown model {name!r}"
                return "model", f"model {name!r} has no production version; pin a 'version'"
            version = prod
        info = self.version(session, name, version)
        if info is None:
            if not registry.list_versions(session, name):
                return "model", f"unknown model {name!r}"
            return "version", f"model {name!r} has no version {version}"
        return info


registry_view = RegistryView()
