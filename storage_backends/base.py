"""The one small interface every storage backend implements.

A backend stores named objects (keys like ``web01/3f2a.../vda.qcow2``) and knows
nothing of domains or jobs. Every write is all-or-nothing: a reader never sees a
half-written object under its final key. Large objects are streamed in bounded memory
and their SHA-256 is computed while they are written or read, in the same pass.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from virtwarden.errors import InvalidName

Blob = bytes | bytearray  # an object's bytes as they are handed to a backend

# Called with the number of bytes moved so far.
Progress = Callable[[int], None]

CHUNK = 4 * 1024 * 1024  # streaming buffer size
_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # When the storage last wrote the object, by the storage's own clock (seconds since
    # the epoch; None where a backend cannot say): ages that compare writers on
    # machines whose clocks differ (format 2's markers).
    modified: float | None = field(default=None, compare=False)


def check_key(key: str) -> str:
    """Refuse absolute paths, ``..``, empty parts and characters outside a safe set."""
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise InvalidName(f"invalid object name {key!r}: use letters, digits, '._-' and '/' between parts")
    return key


class Backend(ABC):
    """Lifecycle: construct (cheap, no I/O), ``check()`` to prove it works, use, ``close()``."""

    kind: str = "?"
    # Format-2 chunks read or written at a time (the target's ``chunk_concurrency``).
    chunk_concurrency: int = 4
    # Whether ``exists`` is a request to a server (S3: a HEAD), not a local lookup: a
    # format-2 backup then stops asking about every new chunk (store.Lookups).
    costly_lookups: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def describe(self) -> str:
        """Where the objects go, fit for a log line (no secrets)."""

    @abstractmethod
    def check(self) -> None:
        """Prove the target is reachable and writable; raise StorageUnavailable otherwise."""

    @abstractmethod
    def put_file(self, key: str, source: Path, *, progress: Progress | None = None) -> StoredObject:
        """Stream ``source`` to ``key``; the object appears whole or not at all."""

    @abstractmethod
    def put_bytes(self, key: str, data: Blob) -> StoredObject:
        """Store a small object (a manifest) atomically."""

    @abstractmethod
    def get_file(
        self,
        key: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
        durable: bool = True,
    ) -> StoredObject:
        """Stream ``key`` into ``dest``, hashing exactly the bytes written there; raise
        ChecksumMismatch (and leave no ``dest``) when ``expected_sha256`` is given and
        differs. ``durable=False`` skips the fsyncs, for a scratch copy that is deleted
        after use."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a small object; ObjectNotFound when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def put_new_bytes(self, key: str, data: Blob) -> bool:
        """Store a small object unless one is under ``key`` already, which is then left
        as it is; whether it was stored. This default looks first (two steps: another
        writer may store the key in between, which for a format-2 chunk stores the same
        data twice); S3 asks the endpoint to refuse the PUT instead (``If-None-Match``)."""
        return look_then_put(self, key, data)

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a folder when it ends in '/'), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    @abstractmethod
    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Remove leftovers of interrupted writes under ``prefix`` (temporary files,
        unfinished multipart uploads); returns how many were removed."""

    def verify(self, key: str, expected_sha256: str, *, progress: Progress | None = None) -> int:
        """Read ``key`` through and check its SHA-256 without keeping the bytes; returns
        its size. ChecksumMismatch when it differs, ObjectNotFound when absent."""
        raise NotImplementedError

    def batch(self) -> Batch:
        """A writer of many small objects (chunks) whose durability may be settled once
        at the end (``Batch``). This default writes each object at once, durably."""
        return Batch(self)

    # --- optional: backends on a local or mounted filesystem ------------------------
    def stage(self, key: str) -> Path | None:
        """A local path, on the target's own filesystem, where a producer (libvirt
        writing a backup image) may create ``key``'s content directly; publish it with
        ``publish_staged``. None when the backend has no filesystem (S3): then write to
        scratch space and ``put_file``. Saves a whole copy of every image on NFS."""
        return None

    def publish_staged(self, key: str, staged: Path, *, progress: Progress | None = None) -> StoredObject:
        """Hash, sync and atomically publish a file made at ``stage(key)``."""
        raise NotImplementedError(f"{self.kind} backends do not stage")

    def local_path(self, key: str) -> Path | None:
        """The object's own file, for reading in place (never for writing); None when
        the backend has no filesystem. ObjectNotFound when absent. Bytes read from it
        later are not the bytes a check read earlier: a restore copies instead
        (``get_file``), so what it uses is what it hashed."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: a backend without connections keeps this
        """Release connections; the default holds none."""


class Batch:
    """Small objects written together: use as a context manager. ``put_bytes`` and
    ``exists`` behave as the backend's, except that an object may become visible to
    other readers and durable only when the block ends without an error; an error
    leaves none of the batch's objects that were not visible yet. This base class
    writes through at once (S3: every PUT is durable when it returns)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind, error, tb) -> None:
        return None

    def put_bytes(self, key: str, data: Blob) -> None:
        self.backend.put_bytes(key, data)

    def exists(self, key: str) -> bool:
        return self.backend.exists(key)

    def put_new_bytes(self, key: str, data: Blob) -> bool:
        """``Backend.put_new_bytes`` within the batch: this one writes through, so the
        backend's own (S3: one conditional PUT); a batch that holds objects back looks
        in itself first (``look_then_put``)."""
        return self.backend.put_new_bytes(key, data)


def look_then_put(writer: Backend | Batch, key: str, data: Blob) -> bool:
    """``put_new_bytes`` in two steps: look, then store when nothing is there."""
    if writer.exists(key):
        return False
    writer.put_bytes(key, data)
    return True
