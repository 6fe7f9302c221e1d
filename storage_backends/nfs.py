"""Objects as files under a mounted path (NFS, or any local filesystem).

A key ``web01/3f2a/vda.qcow2`` is the file ``<path>/web01/3f2a/vda.qcow2``. Every write
goes to ``.tmp-<uuid>-<name>`` in the target's directory, is fsynced, renamed over the
final name (atomic on POSIX and NFS), and the directory is fsynced: a crash leaves either
the old object, the new one, or a stray ``.tmp-`` file that ``list()`` ignores and
``cleanup_incomplete()`` removes.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

from virtwarden.storage_backends import _stream as s
from virtwarden.storage_backends.base import (
    CHUNK,
    Backend,
    Batch,
    Blob,
    ObjectInfo,
    Progress,
    StoredObject,
    look_then_put,
)

from virtwarden import faults, permissions
from virtwarden.config import NfsStorage
from virtwarden.errors import ObjectNotFound, StorageError, StorageUnavailable, VirtwardenError

log = logging.getLogger(__name__)
T = TypeVar("T")

STALE_RETRIES = 3  # NFS file handles go stale when the server side changes under us
_UNREACHABLE = {errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH}


class NfsBackend(Backend):
    kind = "nfs"

    def __init__(self, name: str, settings: NfsStorage) -> None:
        super().__init__(name)
        self.root = Path(settings.path)
        self.chunk_concurrency = settings.chunk_concurrency
        self.fsync = settings.fsync
        self.create = settings.create
        self.who = f"storage '{name}'"

    def describe(self) -> str:
        return f"nfs:{self.root}"

    # --- lifecycle ---------------------------------------------------------------
    def check(self) -> None:
        probe = self.root / s.temp_name("probe")
        try:
            self._require_root()
            s.write_atomic(probe, [b"probe"], fsync=self.fsync)
            probe.unlink()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise s.os_error(self.who, e, probe) from e
            raise StorageUnavailable(f"{self.who}: path {self.root} is not usable: {e.strerror}") from e

    # --- objects -----------------------------------------------------------------
    def put_file(self, key: str, source: Path, *, progress: Progress | None = None) -> StoredObject:
        path = self._path(s.check_data_key(key))
        with self._errors(path), open(source, "rb") as f:
            return self._write(key, path, s.file_chunks(f, CHUNK), progress)

    def put_bytes(self, key: str, data: Blob) -> StoredObject:
        path = self._path(s.check_data_key(key))
        with self._errors(path):
            return self._write(key, path, [data], None)

    def _write(self, key: str, path: Path, chunks, progress: Progress | None) -> StoredObject:
        self._require_root()
        s.make_dirs(path.parent, fsync=self.fsync)
        size, sha = s.write_atomic(path, chunks, fsync=self.fsync, progress=progress)
        return StoredObject(key, size, sha)

    def batch(self) -> Batch:
        return _SyncedTogether(self)

    def stage(self, key: str) -> Path:
        path = self._path(s.check_data_key(key))
        with self._errors(path):
            self._require_root()
            s.make_dirs(path.parent, fsync=self.fsync)
        # A temporary name in the final directory: hidden from list(), removed by
        # cleanup_incomplete() if the producer dies, renamed into place on publish.
        return path.with_name(s.temp_name(path.name))

    def publish_staged(self, key: str, staged: Path, *, progress: Progress | None = None) -> StoredObject:
        path = self._path(s.check_data_key(key))
        if staged.parent != path.parent or not staged.name.startswith(s.TMP_PREFIX):
            raise StorageError(f"{self.who}: {staged} was not staged for {key!r}")
        with self._errors(path):
            # libvirt created the file (as root or QEMU's user, through its umask): the
            # repository's mode before it gets its final name.
            permissions.adopt_file(staged)
            size, sha = s.hash_file(staged, progress)  # mostly from the page cache: just written
            if self.fsync:
                fd = os.open(staged, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(staged, path)
            if self.fsync:
                s.fsync_dir(path.parent)
        return StoredObject(key, size, sha)

    def verify(self, key: str, expected_sha256: str, *, progress: Progress | None = None) -> int:
        path = self.local_path(key)
        with self._errors(path):
            size, sha = _retry_stale(lambda: s.hash_file(path, progress))
        if sha != expected_sha256:
            raise s.checksum_error(self.who, key, expected_sha256, sha)
        return size

    def local_path(self, key: str) -> Path:
        path = self._path(s.check_key(key))
        with self._errors(path):
            if not _retry_stale(path.is_file):
                self._require_root()
                raise ObjectNotFound(f"{self.who}: no object {key!r} ({path})")
        return path

    def get_file(
        self,
        key: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
        durable: bool = True,
    ) -> StoredObject:
        path = self._path(s.check_key(key))

        def verify(size: int, sha: str) -> None:
            if expected_sha256 and sha != expected_sha256:
                raise s.checksum_error(self.who, key, expected_sha256, sha)

        def once() -> StoredObject:
            with self._open_object(key, path) as f:
                s.make_dirs(dest.parent, fsync=False)
                size, sha = s.write_atomic(
                    dest, s.file_chunks(f, CHUNK), fsync=self.fsync and durable, verify=verify, progress=progress
                )
            return StoredObject(key, size, sha)

        with self._errors(dest):  # read errors are rare; a full restore disk is not
            return _retry_stale(once)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(s.check_key(key))

        def once() -> bytes:
            with self._open_object(key, path) as f:
                return f.read()

        with self._errors(path):
            return _retry_stale(once)

    def exists(self, key: str) -> bool:
        path = self._path(s.check_key(key))
        with self._errors(path):
            if _retry_stale(path.is_file):
                return True
            self._require_root()  # a missing share is not a missing object
            return False

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = self._scan(s.check_prefix(prefix))
        return iter([ObjectInfo(k, size, modified) for k, size, modified in found if not s.is_hidden(k)])

    def delete(self, key: str) -> None:
        path = self._path(s.check_key(key))
        with self._errors(path):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            if self.fsync:
                s.fsync_dir(path.parent)
            self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, directory: Path) -> None:
        """Remove directories left empty by a delete (a pruned point's, then its chain's),
        never the top-level one under the root (a domain's, where new chains appear).
        rmdir is atomic and refuses a directory that is not empty, so a file written
        meanwhile is never lost."""
        while directory != self.root and directory.parent != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return
            if self.fsync:
                s.fsync_dir(directory.parent)
            directory = directory.parent

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Remove ``.tmp-*`` files under ``prefix``. A write in progress also has one:
        call this only while no writer is active there."""
        removed = 0
        prefix = s.check_prefix(prefix)
        folder = prefix.rpartition("/")[0]
        top = self.root / folder
        with self._errors(top):
            self._require_root()
            # Walked, not listed: a format-2 gc cleans every chunk folder (millions of
            # files) and holds one folder's entries at a time.
            for key, _entry in _files(top, folder + "/" if folder else "", prefix):
                if key.rpartition("/")[2].startswith(s.TMP_PREFIX):
                    (self.root / key).unlink(missing_ok=True)
                    log.info("%s: removed interrupted write %s", self.who, key)
                    removed += 1
        return removed

    # --- helpers -----------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key

    def _require_root(self) -> None:
        """The base directory is created only when the settings say so: an unmounted
        share must be an error, not a silent write to the local disk beneath it."""
        if not self.root.is_dir():
            if not self.create:
                raise StorageUnavailable(
                    f"{self.who}: path {self.root} does not exist or is not a mounted directory"
                )
            s.make_dirs(self.root, fsync=self.fsync)

    @contextmanager
    def _open_object(self, key: str, path: Path) -> Iterator[BinaryIO]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with f` below; only the open is guarded
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._require_root()  # a missing share is not a missing object
            raise ObjectNotFound(f"{self.who}: no object {key!r} ({path})") from None
        with f:
            yield f

    def _scan(self, prefix: str) -> Sequence[tuple[str, int, float]]:
        """All (key, size, mtime) under ``prefix``, sorted; a full sort because a walk's order
        ('a' before 'a.b', but 'a.b' < 'a/x') is not key order."""
        folder = prefix.rpartition("/")[0]
        top = self.root / folder
        with self._errors(top):
            self._require_root()
            return sorted(_retry_stale(lambda: _walk(top, folder + "/" if folder else "", prefix, [])))

    @contextmanager
    def _errors(self, path: Path) -> Iterator[None]:
        """Turn OSError into the product's errors, once, here at the edge."""
        try:
            yield
        except VirtwardenError:
            raise
        except OSError as e:
            if e.errno in _UNREACHABLE:
                raise StorageUnavailable(f"{self.who}: {self.root} unreachable: {e.strerror} ({path})") from e
            raise s.os_error(self.who, e, path) from e


class _SyncedTogether(Batch):
    """Many small objects (a disk's chunks) made durable with two filesystem syncs per
    ``LIMIT`` objects instead of two fsyncs each. Each object is written under a temporary
    name and not synced, and its writeback is started at once (``start_writeback``); every
    ``LIMIT`` objects and at the end, one syncfs makes all their bytes durable, then they
    are renamed into place, and a second syncfs makes the names durable. A crash leaves
    temporary files (hidden from ``list()``, removed by ``cleanup_incomplete()``), never a
    named object whose bytes could be lost; an error inside the block removes the
    temporary files not renamed yet. At most ``LIMIT`` names are held in memory (a few
    MB).

    Why so rarely and why the early writeback (measured on ext4, 4,096 chunks of 512 KiB
    from four threads): a syncfs stalls every writer of the filesystem while its journal
    commits, so syncs every 1,024 objects made the disk and the writers take turns (9.0
    to 9.5 s); one sync at the end with each file's writeback started as it was written
    kept the disk busy throughout (6.3 s, what ``cp`` + fsync of the same 2 GiB takes
    there), the final syncs then waiting 0.3 to 0.5 s."""

    LIMIT = 16384  # 8 GiB of 512 KiB chunks

    def __init__(self, backend: NfsBackend) -> None:
        super().__init__(backend)
        self.nfs = backend
        self._pending: dict[Path, Path] = {}  # final path -> temporary file
        self._dirs: set[Path] = set()  # made or seen by this batch: not looked at again
        self._lock = threading.Lock()

    def __enter__(self) -> _SyncedTogether:
        with self.nfs._errors(self.nfs.root):
            self.nfs._require_root()
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self._flush()
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: Blob) -> None:
        path = self.nfs._path(s.check_data_key(key))
        with self.nfs._errors(path):
            if path.parent not in self._dirs:
                s.make_dirs(path.parent, fsync=False)  # made durable by the sync after the renames
                self._dirs.add(path.parent)
            tmp = s.write_temp(path, data, writeback=self.nfs.fsync)
        with self._lock:
            if path in self._pending:  # another thread wrote the same object meanwhile
                tmp.unlink()
                return
            self._pending[path] = tmp
            full = len(self._pending) >= self.LIMIT
        if full:
            self._flush()

    def exists(self, key: str) -> bool:
        with self._lock:
            if self.nfs._path(s.check_key(key)) in self._pending:
                return True
        return self.nfs.exists(key)

    def put_new_bytes(self, key: str, data: Blob) -> bool:
        return look_then_put(self, key, data)  # the objects this batch holds back count

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            faults.pause_point("chunks-before-sync")
            with self.nfs._errors(self.nfs.root):
                if self.nfs.fsync:
                    s.sync_filesystem(self.nfs.root)
                for path, tmp in pending.items():
                    os.replace(tmp, path)
                if self.nfs.fsync:
                    s.sync_filesystem(self.nfs.root)
        except BaseException:
            for tmp in pending.values():
                tmp.unlink(missing_ok=True)
            raise


def _walk(directory: Path, rel: str, prefix: str,
          found: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    for key, entry in _files(directory, rel, prefix):
        st = entry.stat()
        found.append((key, st.st_size, st.st_mtime))  # mtime: set by the file server on NFS
    return found


def _files(directory: Path, rel: str, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
    """(key, entry) of every file under ``directory`` whose key starts with ``prefix``, one
    folder's entries in memory at a time, in no particular order."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        key = rel + entry.name
        if entry.is_dir(follow_symlinks=False):
            below = key + "/"
            if below.startswith(prefix) or prefix.startswith(below):  # skip folders that cannot match
                yield from _files(Path(entry.path), below, prefix)
        elif key.startswith(prefix) and entry.is_file():
            yield key, entry


def _retry_stale(fn: Callable[[], T]) -> T:
    for attempt in range(STALE_RETRIES):
        try:
            return fn()
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == STALE_RETRIES - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
