"""Where artifacts go: one interface (``base.Backend``), one module per backend."""
from __future__ import annotations

from virtwarden.storage_backends.base import Backend, ObjectInfo, StoredObject


def open_backend(name: str, settings) -> Backend:
    """Build the backend for a configured storage target (``virtwarden.config`` models)."""
    if settings.type == "nfs":
        from virtwarden.storage_backends.nfs import NfsBackend

        return NfsBackend(name, settings)
    if settings.type == "s3":
        from virtwarden.storage_backends.s3 import S3Backend

        return S3Backend(name, settings)
    raise ValueError(f"unknown storage type {settings.type!r}")


__all__ = ["Backend", "ObjectInfo", "StoredObject", "open_backend"]
