"""Chunks of a format-2 repository on a storage backend, and the two streams over them:
a disk's content into chunks and an index (``write_disk``), an index back into a disk
(``read_disk``).

Layout (docs/repository-format.md)::

    chunks/<first two hex digits of the id>/<id>     one sealed chunk

Both streams run ``workers`` chunks at a time (by default the storage target's
``chunk_concurrency``) and never hold more than about ``2 * workers`` chunks in memory,
whatever the size of the disk.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from virtwarden.storage_backends.base import Backend, Batch, ObjectInfo
from virtwarden.storage_backends.format2.index import DiskIndex, count
from virtwarden.storage_backends.format2.objects import Codec, DamagedObject

from virtwarden.errors import ChecksumMismatch, ObjectNotFound

FOLDERS = tuple(f"{i:02x}" for i in range(256))  # chunks/<first two hex digits of the id>/
ReadAt = Callable[[int, int], bytes | bytearray]  # (offset, length) -> exactly length bytes
WriteAt = Callable[[int, bytes], object]  # what it returns is ignored
Range = tuple[int, int]  # (offset, length)


@dataclass
class WriteStats:
    """What one disk's write did: bytes read from the disk, chunks and bytes stored anew
    (after compression and encryption), chunks found already stored, zero pieces."""

    read_bytes: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    known_chunks: int = 0
    zero_chunks: int = 0
    reused_chunks: int = 0  # taken from the previous index without reading
    repaired: set[str] = field(default_factory=set)  # damaged chunks stored again
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class LostChunk(DamagedObject):
    """A chunk of the previous index that a partial change had to be laid over could not
    be read (damaged or missing): ``chunk``, its id."""

    def __init__(self, message: str, chunk: str) -> None:
        super().__init__(message)
        self.chunk = chunk


class ChunkStore:
    def __init__(self, backend: Backend, codec: Codec) -> None:
        self.backend = backend
        self.codec = codec
        self.workers = backend.chunk_concurrency  # chunks read or written at a time
        keep_chunk_buffers()

    @staticmethod
    def key(cid: str) -> str:
        return f"chunks/{cid[:2]}/{cid}"

    def put(self, data: bytes | bytearray, into: Batch | None = None, *,
            known: Container[str] = frozenset(), damaged: Container[str] = frozenset(),
            lookups: Lookups | None = None) -> tuple[str, int]:
        """Store a chunk unless it is stored already; its id and the bytes stored (0 when
        it was there). ``into``: a batch of the backend's (``Backend.batch``). ``known``:
        ids of chunks certainly stored (``write_disk``): not looked up in storage again.
        ``damaged``: ids of chunks found damaged and left in storage: stored again over
        what is there, whatever storage says. ``lookups``: whether to ask storage first
        (else always)."""
        writer = into or self.backend
        cid = self.codec.chunk_id(data)
        key = self.key(cid)
        blind = False  # stored without asking first: only if no object is there
        if cid not in damaged:
            if cid in known:
                return cid, 0
            if lookups is None or lookups.wanted():
                found = writer.exists(key)
                if lookups is not None:
                    lookups.saw(found)
                if found:
                    return cid, 0
            else:
                blind = True
        blob = self.codec.seal("chunk", cid, data)
        if blind:
            if not writer.put_new_bytes(key, blob):
                assert lookups is not None
                lookups.saw(True)  # data stored before: ask about every chunk again
                return cid, 0
        else:
            writer.put_bytes(key, blob)
        return cid, len(blob)

    def get(self, cid: str, *, check_id: bool = True) -> bytes:
        """The chunk's data, authenticated; ``check_id``: its id computed again too
        (``Codec.open``). DamagedObject also when the storage's own checksum of the
        object fails: either way its bytes are not the ones stored."""
        try:
            blob = self.backend.get_bytes(self.key(cid))
        except DamagedObject:
            raise
        except ChecksumMismatch as e:  # the storage's own checksum of the object (S3: its sha256 metadata)
            raise DamagedObject(f"chunk {cid}: {e}") from e
        return self.codec.open("chunk", cid, blob, check_id=check_id)

    def ids(self) -> Iterator[str]:
        """The id of every stored chunk (for gc and verify)."""
        for info in self.stored():
            yield info.key.rsplit("/", 1)[1]

    def stored(self) -> Iterator[ObjectInfo]:
        """Every stored chunk object, one of the 256 folders at a time: what is held in
        memory at once is a folder's listing (1/256 of the chunks), not the whole of it."""
        for folder in FOLDERS:
            yield from list(self.backend.list(f"chunks/{folder}/"))


class Lookups:
    """Whether ``ChunkStore.put`` asks storage if a chunk is there before storing it, for
    one disk's write. Asking costs a request on S3 (a HEAD before each new chunk's PUT:
    35% of storing new data against the test bed's endpoint, and a round trip per chunk
    against a distant one). So where a lookup is a request (``Backend.costly_lookups``),
    after ``MISSES`` chunks in a row that were not there (new data: a first full, fresh
    writes) only every ``SAMPLE``-th chunk is asked about; the others are stored with
    ``put_new_bytes`` (S3: a PUT the endpoint refuses when the object is there, which is
    then left as it is). One found there (data stored before: a clone of a template, a
    disk copied) has every chunk asked about again, so its bytes are not sent for
    nothing. On a directory every chunk is looked up (a stat)."""

    MISSES, SAMPLE = 64, 8

    def __init__(self, costly: bool) -> None:
        self.costly = costly
        self._misses = 0
        self._seen = 0
        self._lock = threading.Lock()

    def wanted(self) -> bool:
        with self._lock:
            self._seen += 1
            return not self.costly or self._misses < self.MISSES or self._seen % self.SAMPLE == 0

    def saw(self, found: bool) -> None:
        with self._lock:
            self._misses = 0 if found else self._misses + 1


def write_disk(store: ChunkStore, target: str, read_at: ReadAt, virtual_size: int, chunk_size: int, *,
               previous: DiskIndex | None = None, changed: Iterable[Range] | None = None, whole: bool = False,
               known: Container[str] = frozenset(), damaged: Container[str] = frozenset(),
               workers: int | None = None) -> tuple[DiskIndex, WriteStats]:
    """The index of a disk whose content ``read_at`` gives, storing the chunks that are
    not stored yet. Without ``changed`` every chunk is read (identical ones are still
    stored once). With ``previous`` (the last index of this disk: same size and chunk
    size) and ``changed`` (the ranges written since), ``read_at`` is asked for changed
    bytes only: a chunk they do not touch keeps the previous index's id, and one they
    touch in part is the previous chunk (fetched from the repository) with the changed
    bytes laid over it. So ``read_at`` may read from an image that holds only the
    changes (an incremental backup target). ``whole``: ``read_at`` serves every byte of
    the disk (an NBD export of it), so a chunk a change touches is read whole instead,
    which costs less than fetching, opening and checking the previous chunk. Without
    ``previous``, ``changed`` names the ranges that hold data (the image's allocation):
    a chunk they do not touch reads as zeros and is neither read nor stored.
    ``known``: ids of chunks certainly stored (a published point's, read while this
    backup's marker keeps gc off): a chunk with one of them is not looked up in storage
    (on S3, a HEAD request each); of the others, on S3, a run of new data has only a
    sample looked up (``Lookups``). ``damaged``: ids of chunks found damaged and left in
    storage: one of them produced here is stored again (``stats.repaired``). The chunks
    are written as one batch of the backend's: all of them are stored durably when this
    returns, none is visible under its name before its bytes are durable."""
    n = count(virtual_size, chunk_size)
    stats = WriteStats()
    lookups = Lookups(store.backend.costly_lookups)
    dirty: dict[int, list[Range]] | None = None
    if changed is not None:
        if previous is None:
            whole = True  # a full: every chunk that holds data is read whole
        elif (previous.virtual_size, previous.chunk_size) != (virtual_size, chunk_size):
            raise ValueError(f"{target}: the previous index is of another size or chunk size")
        dirty = _touched(changed, chunk_size, virtual_size)
    ids: list[str | None] = [None] * n

    def one(i: int) -> None:
        offset = i * chunk_size
        length = min(chunk_size, virtual_size - offset)
        parts = None if dirty is None else dirty[i]
        if parts is None or whole or parts == [(offset, length)]:
            data = read_at(offset, length)
            stats.add(read_bytes=length)
        else:
            assert previous is not None
            base_id = previous.chunks[i]
            try:
                chunk = bytearray(store.get(base_id) if base_id else bytes(length))
            except (DamagedObject, ObjectNotFound) as e:
                assert base_id is not None
                raise LostChunk(f"{target} at offset {offset}: the previous point's chunk {base_id} cannot be read "
                                f"({e})", base_id) from e
            for at, size in parts:
                chunk[at - offset:at - offset + size] = read_at(at, size)
                stats.add(read_bytes=size)
            data = bytes(chunk)
        if not _zeros(data):  # zero pieces are not stored
            cid, stored = store.put(data, batch, known=known, damaged=damaged, lookups=lookups)
            ids[i] = cid
            if cid in damaged:
                stats.repaired.add(cid)  # a set's add holds the GIL: one thread at a time
            stats.add(stored_chunks=1 if stored else 0, stored_bytes=stored, known_chunks=0 if stored else 1)
        else:
            stats.add(zero_chunks=1)

    if dirty is not None and previous is not None:
        for i, cid in enumerate(previous.chunks):
            if i not in dirty:
                ids[i] = cid
        stats.add(reused_chunks=n - len(dirty))
    elif dirty is not None:
        stats.add(zero_chunks=n - len(dirty))
    with store.backend.batch() as batch:
        bounded(one, range(n) if dirty is None else sorted(dirty), workers or store.workers)
    return DiskIndex(target, virtual_size, chunk_size, tuple(ids)), stats


def read_disk(store: ChunkStore, index: DiskIndex, write_at: WriteAt, *, workers: int | None = None) -> int:
    """Write every stored piece of ``index`` through ``write_at`` (zero pieces are left
    alone: the destination reads as zeros there); the bytes written."""
    written = 0
    lock = threading.Lock()
    pieces = [(offset, length, cid) for offset, length, cid in index.pieces() if cid is not None]

    def one(piece: tuple[int, int, str | None]) -> None:
        nonlocal written
        offset, length, cid = piece
        assert cid is not None
        try:
            data = store.get(cid, check_id=False)  # authenticated: the tag binds it to its id
        except DamagedObject as e:
            raise DamagedObject(f"{index.target} at offset {offset}: {e}") from e
        except ObjectNotFound as e:
            raise DamagedObject(f"{index.target} at offset {offset}: chunk {cid} is missing") from e
        if len(data) != length:
            raise DamagedObject(f"{index.target} at offset {offset}: chunk {cid} holds {len(data)} bytes, "
                                f"the index says {length}")
        write_at(offset, data)
        with lock:
            written += length

    bounded(one, pieces, workers or store.workers)
    return written


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_chunk_buffers() -> bool:
    """Let this process reuse the memory of freed chunk-sized buffers (once per process;
    False where the C library is not glibc). glibc serves each allocation of 128 KiB and
    more with a fresh ``mmap`` and unmaps it when freed (its adaptive threshold never
    rises above a size allocated over and over), so every copy of a 512 KiB chunk (read,
    compressed, sealed) cost 128 page faults of zeroed memory: measured, sealing ran at
    280 MB/s instead of 535. Buffers up to 32 MiB now come from the heap, and up to
    256 MiB freed at its top stays with the process; memory still follows what is in use
    (a bounded number of chunks per stream)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def _zeros(data: bytes | bytearray) -> bool:
    """All zero bytes? Compared with zeros of the same length (memcmp, which stops at the
    first byte that is not: at once for most data), 20x faster than counting them."""
    return data == _zero_bytes(len(data))


@functools.lru_cache(maxsize=8)
def _zero_bytes(length: int) -> bytes:
    return bytes(length)  # a chunk's size, and the shorter last piece of a disk


def _touched(changed: Iterable[Range], chunk_size: int, virtual_size: int) -> dict[int, list[Range]]:
    """For each chunk a change touches: the changed (offset, length) ranges within it,
    merged and in order."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for offset, length in changed:
        lo, hi = max(offset, 0), min(offset + length, virtual_size)
        while lo < hi:
            i = lo // chunk_size
            end = min(hi, (i + 1) * chunk_size)
            spans.setdefault(i, []).append((lo, end))
            lo = end
    out: dict[int, list[Range]] = {}
    for i, pieces in spans.items():
        merged: list[list[int]] = []
        for lo, hi in sorted(pieces):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out[i] = [(lo, hi - lo) for lo, hi in merged]
    return out


def bounded(fn: Callable, items: Iterable, workers: int) -> None:
    """``fn(item)`` for each item on ``workers`` threads, at most ``2 * workers`` started
    and not finished (memory stays bounded); after an error no new item starts, and the
    first error is raised once the running ones have ended."""
    slots = threading.Semaphore(2 * workers)
    errors: list[BaseException] = []

    def run(item: object) -> None:
        try:
            fn(item)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(e)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            slots.acquire()
            if errors:
                slots.release()
                break
            pool.submit(run, item)
    if errors:
        raise errors[0]
