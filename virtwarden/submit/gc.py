"""Collecting a format-2 repository's unused chunks (tasks/gc.py)."""
from __future__ import annotations

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import UsageError
from virtwarden.submit import Planned


def plan_gc(cfg: Config, cat: Catalog, storage: str | None) -> Planned:
    """A gc of format-2 target ``storage``. It runs on the host whose worker made the
    newest point stored there (that worker reaches the storage), else the first
    configured host; it touches no hypervisor."""
    if not storage:
        raise UsageError("a gc names its storage target")
    if cfg.storage_target(storage).format != 2:  # an unknown name is an error here, with suggestions
        raise UsageError(f"storage {storage!r} is not a format-2 target: nothing to collect")
    newest = points.newest_host(cat, storage)
    host = newest if newest in cfg.hosts else next(iter(cfg.hosts))
    return Planned("gc", None, host, {"storage": storage}, {"storage": storage, "host": host})
