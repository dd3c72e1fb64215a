"""What the API needs of the model registry, cached: versions are immutable, production moves.

The production map is re-read every ``INFERQ_REGISTRY_CACHE_S`` (and at once after a
promotion through this process), so a submit costs no registry query in the common case.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.models import registry

__all__ = ["VersionInfo", "RegistryView", "registry_view"]


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

    def invalidate(self) -> None:
        self._production_at = 0.0

    def production(self, session: Session) -> dict[str, int]:
        if time.monotonic() - self._production_at > get_settings().registry_cache_s:
            with self._lock:
                self._production = registry.production_versions(session)
                self._production_at = time.monotonic()
        return self._production

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
        """The answer of ``resolve`` from memory alone, or None if it needs the database."""
        if version is None:
            if time.monotonic() - self._production_at > get_settings().registry_cache_s:
                return None
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
