"""The repository layout and the manifest, on top of any backend.

Layout (under the target's path or prefix)::

    <domain>/<chain_id>/<point_id>/<disk>.qcow2      one image per disk
    <domain>/<chain_id>/<point_id>/manifest.json     written last

A restore point exists in storage exactly when its manifest exists: the manifest is
written only after every artifact is stored and checked, and deleted first when a point
is pruned. An interrupted write therefore leaves objects without a manifest, which are
never listed and are removed by ``abandon``.

Manifest (JSON, ``format: virtwarden-manifest/1``): point id, chain id, parent id,
sequence number in the chain, level (full|incremental), strategy, consistency
(crash|quiesced), times, the domain (name, uuid, XML at backup time), the checkpoint
(name and XML, so it can be redefined on another host), and per disk: target, mode
(full: a standalone image; incremental: only changed clusters, read over the previous
point), key, size, sha256 and virtual size.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from storage_backends.base import Backend, check_key
from virtwarden.errors import ObjectNotFound, StorageError

FORMAT = "virtwarden-manifest/1"
MANIFEST = "manifest.json"


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

    def read_manifest(self, key: str) -> dict[str, Any]:
        try:
            data = json.loads(self.backend.get_bytes(key))
        except ObjectNotFound:
            raise ObjectNotFound(f"storage {self.backend.name}: restore point manifest {key} is missing") from None
        except ValueError as e:
            raise StorageError(f"storage {self.backend.name}: manifest {key} is not valid JSON: {e}") from e
        if data.get("format") != FORMAT:
            raise StorageError(f"storage {self.backend.name}: {key} has unknown format {data.get('format')!r}")
        return data

    def manifests(self, domain: str) -> Iterator[str]:
        """Keys of every published manifest of ``domain``."""
        for obj in self.backend.list(check_key(domain) + "/"):
            if obj.key.endswith("/" + MANIFEST):
                yield obj.key

    def abandon(self, prefix: str) -> int:
        """Remove what an interrupted write left under a point that was never published."""
        if self.backend.exists(self.manifest_key(prefix)):
            raise StorageError(f"refusing to abandon {prefix}: it is a published restore point")
        removed = 0
        for obj in list(self.backend.list(prefix)):
            self.backend.delete(obj.key)
            removed += 1
        return removed + self.backend.cleanup_incomplete(prefix)

    def delete_point(self, prefix: str) -> None:
        """Unpublish first (manifest), then remove the data: a crash in between leaves
        unlisted leftovers, never a listed point with missing data."""
        self.backend.delete(self.manifest_key(prefix))
        for obj in list(self.backend.list(prefix)):
            self.backend.delete(obj.key)
