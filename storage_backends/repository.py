"""The repository layout and the manifest, on top of any backend.

Layout (under the target's path or prefix)::

    <domain>/<chain_id>/<point_id>/<disk>.qcow2      one image per disk
    <domain>/<chain_id>/<point_id>/manifest.json     written last

A restore point exists in storage exactly when its manifest exists: the manifest is
written only after every artifact is stored and checked, and deleted first when a point
is pruned. An interrupted write therefore leaves objects without a manifest, which are
never listed and are removed when the job is recovered
(``tasks.recovery.remove_point_data``).

Manifest (JSON, ``format: virtwarden-manifest/1``): point id, chain id, parent id,
sequence number in the chain, level (full|incremental), strategy, consistency
(crash|quiesced), times, the domain (name, uuid, XML at backup time), the checkpoint
(name and XML, so it can be redefined on another host), and per disk: target, mode
(full: a standalone image; incremental: only changed clusters, read over the previous
point), key, size, sha256 and virtual size.

The catalog keeps each manifest's SHA-256 as stored (``write_manifest`` returns it);
readers that act on a manifest pass it to ``read_manifest``, which refuses a manifest
whose bytes are not those (ChecksumMismatch, before they are even parsed): a manifest
edited or replaced after the backup is never trusted, even when it is valid JSON.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from virtwarden.storage_backends.base import Backend, check_key

from virtwarden.errors import ChecksumMismatch, ObjectNotFound, StorageError

FORMAT = "virtwarden-manifest/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoredManifest:
    """A manifest as read: its key, the SHA-256 of its stored bytes, and its content."""

    key: str
    sha256: str
    data: dict[str, Any]


class Repository:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @staticmethod
    def point_prefix(domain: str, chain_id: str, point_id: str) -> str:
        return check_key(f"{domain}/{chain_id}/{point_id}") + "/"

    def artifact_key(self, prefix: str, target: str) -> str:
        return check_key(f"{prefix}{target}.qcow2")

    def manifest_key(self, prefix: str) -> str:
        return prefix + MANIFEST

    def write_manifest(self, prefix: str, manifest: dict[str, Any]) -> str:
        """Publish the point: call only after every artifact is stored and verified.
        Returns the SHA-256 of the manifest as stored, for the catalog to keep."""
        body = json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True).encode()
        return self.backend.put_bytes(self.manifest_key(prefix), body).sha256

    def read_manifest(self, key: str, expected_sha256: str | None = None) -> dict[str, Any]:
        """The manifest at ``key``. With ``expected_sha256`` (the catalog's record) its
        stored bytes must have that SHA-256: ChecksumMismatch otherwise."""
        return self.load_manifest(key, expected_sha256).data

    def load_manifest(self, key: str, expected_sha256: str | None = None) -> StoredManifest:
        """Like ``read_manifest``, with the SHA-256 of the bytes read."""
        try:
            body = self.backend.get_bytes(key)
        except ObjectNotFound:
            raise ObjectNotFound(f"storage {self.backend.name}: restore point {point_of(key)}: manifest {key} "
                                 "is missing") from None
        digest = hashlib.sha256(body).hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise ChecksumMismatch(
                f"storage {self.backend.name}: restore point {point_of(key)}: manifest {key} is not the one the "
                f"catalog recorded (SHA-256 {digest[:16]}..., recorded {expected_sha256[:16]}...): it was changed "
                "or replaced after the backup and is not used")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise StorageError(f"storage {self.backend.name}: manifest {key} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StorageError(f"storage {self.backend.name}: {key} has unknown format {found!r}")
        return StoredManifest(key, digest, data)

    def manifests(self, domain: str | None = None) -> Iterator[str]:
        """Keys of every published manifest of ``domain`` (of every domain: None)."""
        for obj in self.backend.list(check_key(domain) + "/" if domain else ""):
            if is_manifest_key(obj.key):
                yield obj.key

    def delete_point(self, prefix: str) -> None:
        """Unpublish first (manifest), then remove the data: a crash in between leaves
        unlisted leftovers, never a listed point with missing data."""
        self.backend.delete(self.manifest_key(prefix))
        # A format-2 point's manifest (docs/repository-format.md) goes first too.
        for obj in sorted(self.backend.list(prefix), key=lambda o: o.key.rsplit("/", 1)[-1] != "manifest"):
            self.backend.delete(obj.key)


def is_manifest_key(key: str) -> bool:
    """Whether ``key`` is where the layout puts a manifest: ``<domain>/<chain>/<point>/manifest.json``."""
    parts = key.split("/")
    return len(parts) == 4 and parts[-1] == MANIFEST and all(parts)


def point_of(key: str) -> str:
    """The point id in a manifest's (or artifact's) key, as the layout names it."""
    parts = key.split("/")
    return parts[-2] if len(parts) >= 2 else key
