"""What the backends share: moving bytes and hashing them in the same pass, the local
atomic write (temp file beside the target, fsync, rename), and the names they reserve.

Both backends hide the same namespace from ``list()``: files whose last part starts with
``.tmp-`` (writes in progress or interrupted). Writing such a key is refused, so a user
object can never be mistaken for one.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from virtwarden.storage_backends.base import Progress, check_key

from virtwarden import permissions
from virtwarden.errors import ChecksumMismatch, InvalidName, NoSpace, StorageError

TMP_PREFIX = ".tmp-"


def is_hidden(key: str) -> bool:
    """True for temporary objects, which ``list()`` never shows."""
    return key.rpartition("/")[2].startswith(TMP_PREFIX)


def check_data_key(key: str) -> str:
    """``check_key`` plus a refusal of the names the backends keep for themselves."""
    if is_hidden(check_key(key)):
        raise InvalidName(f"invalid object name {key!r}: '.tmp-*' is reserved")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix is a key, or a key followed by '/', or empty."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def temp_name(name: str) -> str:
    return f"{TMP_PREFIX}{uuid.uuid4().hex}-{name[:100]}"


def checksum_error(who: str, key: str, expected: str, actual: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{who}: object {key!r} is corrupt: expected sha256 {expected}, got {actual}"
    )


def os_error(who: str, e: OSError, path: Path | str) -> StorageError:
    """One wording for local I/O failures; a full disk says how much room is left."""
    where = e.filename or path
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{who}: no space left writing {where} ({free_bytes(Path(path))} bytes free)")
    return StorageError(f"{who}: {e.strerror or e} ({where})")


def free_bytes(path: Path) -> int | str:
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return "unknown"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry durable; some filesystems cannot fsync directories."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """syncfs(2) on the filesystem holding ``path``: every dirty page and metadata change
    of that filesystem reaches stable storage (an NFS mount: written and committed on the
    server), in one call instead of a fsync per file. ``os.sync()`` where libc lacks it."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def write_temp(dest: Path, data: bytes | bytearray, *, writeback: bool = False) -> Path:
    """``data`` in a new private file beside ``dest`` under a temporary name, not synced
    and not renamed (``NfsBackend``'s batches do both, for many files at once).
    ``writeback``: start writing the file's pages to storage now, without waiting
    (``start_writeback``)."""
    tmp = dest.with_name(temp_name(dest.name))
    try:
        with os.fdopen(permissions.create_file(tmp), "wb") as f:
            f.write(data)
            if writeback:
                f.flush()
                start_writeback(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to storage and return at
    once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a hint that durability is coming,
    so the disk writes while the caller goes on, and the sync that makes the file durable
    later finds its bytes written or on their way instead of writing them all itself.
    Nothing is promised: a filesystem or libc without it is left to that sync."""
    sync_file_range = getattr(_libc(), "sync_file_range", None)
    if sync_file_range is not None:
        sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def make_dirs(path: Path, *, fsync: bool) -> None:
    """``mkdir -p`` that also fsyncs each parent that gained an entry, so a crash cannot
    lose a directory holding an already-synced file. New directories get the private
    data mode (``virtwarden.permissions``), whatever the umask."""
    for directory in permissions.make_dirs(path):
        if fsync:
            fsync_dir(directory.parent)


def file_chunks(f: BinaryIO, size: int) -> Iterable[bytes]:
    return iter(lambda: f.read(size), b"")


def write_atomic(
    dest: Path,
    chunks: Iterable[bytes],
    *,
    fsync: bool = True,
    verify: Callable[[int, str], None] | None = None,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """Write ``chunks`` beside ``dest`` under a temporary name, hashing exactly the bytes
    written (in a second thread, so a copy costs the slower of writing and hashing, not
    their sum), then rename: ``dest`` appears whole or not at all. ``verify(size,
    sha256)`` may raise to abandon the write; the temporary file is removed on every
    failure. Without ``fsync`` (scratch copies deleted after use) nothing is synced. The
    file is created private (0600, or 0640 for ``security.read_group``) before any byte
    is written, never through a symlink."""
    tmp = dest.with_name(temp_name(dest.name))
    hasher, size = _Hasher(), 0
    try:
        with os.fdopen(permissions.create_file(tmp), "wb") as f:
            for chunk in chunks:
                hasher.add(chunk)
                f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(size)
            digest = hasher.hexdigest()
            if verify:
                verify(size, digest)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        hasher.close()
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(dest.parent)
    return size, digest


class _Hasher:
    """SHA-256 of a stream of chunks, computed by its own thread (hashlib lets go of the
    GIL for large buffers) from the very ``bytes`` objects the caller writes."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def add(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def hash_file(path: Path, progress: Progress | None = None) -> tuple[int, str]:
    """Size and SHA-256 of a file, read once in large chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in file_chunks(f, 8 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
            if progress:
                progress(size)
    return size, digest.hexdigest()
