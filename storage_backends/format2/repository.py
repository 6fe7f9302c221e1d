"""A format-2 repository on a storage backend: its config object, restore points (a
manifest and one index per disk) and their chunks (``store.ChunkStore``).

Layout (docs/repository-format.md)::

    format2/config                           sealed "config": format, repository id, chunk size, chunk ids
    chunks/<2 hex>/<chunk id>                sealed "chunk"
    points/<domain tag>/<point id>/index.<disk>   sealed "index"
    points/<domain tag>/<point id>/manifest       sealed "manifest": written last
    pending/<writer id>                      sealed "marker": a backup under way
    gc/running                               sealed "marker": gc under way

A point exists when its manifest does: chunks are written before the indexes, the indexes
before the manifest, so an interrupted backup leaves only chunks no manifest names, and
gc removes those. The domain tag is a keyed hash of the domain's name: the storage
operator sees neither names nor content.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from virtwarden.storage_backends.base import Backend, ObjectInfo
from virtwarden.storage_backends.format2.index import DiskIndex
from virtwarden.storage_backends.format2.objects import CHUNK_IDS, CONFIG_VERSION, HMAC_SHA256, Codec, DamagedObject
from virtwarden.storage_backends.format2.store import ChunkStore

from virtwarden import faults
from virtwarden.errors import ChecksumMismatch, ObjectNotFound, RestorePointNotFound, StorageError, Transient

FORMAT = 2
CONFIG_KEY = "format2/config"
GC_PREFIX = "gc/"  # each gc's marker: gc/<uuid>
GC_STALE = 600.0  # a gc marker older than this is of a gc that died (a live one renews it)
WRITER_STALE = 86400.0  # a backup marker older than this is of a backup that died
DEFAULT_CHUNK_SIZE = 512 * 1024  # measured: docs/repository-format.md, "Chunk size"


class NotAFormat2Repository(StorageError):
    """The storage holds no format-2 repository (or one this key does not open)."""


@dataclass(frozen=True)
class PointRef:
    domain_tag: str
    point_id: str

    @property
    def prefix(self) -> str:
        return f"points/{self.domain_tag}/{self.point_id}/"

    @property
    def manifest_key(self) -> str:
        return self.prefix + "manifest"

    def index_key(self, target: str) -> str:
        return f"{self.prefix}index.{target}"


@dataclass(frozen=True)
class GcReport:
    chunks: int  # stored before
    referenced: int
    deleted: int
    deleted_bytes: int
    deferred: str | None  # why nothing was deleted this time
    # What the repository holds after this gc (zero when deferred): its published
    # points, the bytes of their disks' non-zero chunks (each point counted whole: what
    # restoring every point would write), and the bytes its chunks take in storage.
    points: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0


@dataclass(frozen=True)
class DomainUsage:
    """What some points take: how many, the bytes of their disks' non-zero chunks (each
    point counted whole), the distinct chunks they name, and what those take stored."""

    points: int
    logical_bytes: int
    chunks: int
    stored_bytes: int


@dataclass(frozen=True)
class Usage:
    """A repository's ``usage()``: its stored chunks (``unused``: named by no point, gc's
    to delete), every point together (``total``), and each domain's points."""

    chunk_size: int
    chunks_stored: int
    chunks_unused: int
    stored_bytes: int
    total: DomainUsage
    domains: dict[str, DomainUsage]


class GcRunning(Transient):
    """gc runs on this storage: a backup waits for it (tried again later)."""


class Format2Repository:
    def __init__(self, backend: Backend, codec: Codec) -> None:
        self.backend = backend
        self.codec = codec
        self._config: dict | None = None

    @functools.cached_property
    def chunks(self) -> ChunkStore:
        """The repository's chunks, named by the function its config says: the config is
        read first, so no chunk is ever named (or checked) by another."""
        self.config  # noqa: B018 - sets self.codec.ids
        return ChunkStore(self.backend, self.codec)

    # --- the repository ------------------------------------------------------------------
    @classmethod
    def init(cls, backend: Backend, codec: Codec, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Format2Repository:
        """Create the repository's config object (StorageError when one exists)."""
        if backend.exists(CONFIG_KEY):
            raise StorageError(f"storage {backend.name} already holds a format-2 repository")
        repo_id = codec.key.repository if codec.key else str(uuid.uuid4())
        doc = {"format": FORMAT, "repository": repo_id, "chunk_size": chunk_size, "chunk_ids": codec.ids,
               "encryption": "aes-256-gcm" if codec.encrypted else "none", "created_at": time.time()}
        backend.put_bytes(CONFIG_KEY, codec.seal("config", CONFIG_KEY, _json(doc), version=CONFIG_VERSION))
        return cls(backend, codec)

    @property
    def config(self) -> dict:
        if self._config is None:
            try:
                blob = self.backend.get_bytes(CONFIG_KEY)
            except ObjectNotFound:
                raise NotAFormat2Repository(f"storage {self.backend.name} holds no format-2 repository") from None
            try:
                config = json.loads(self.codec.open("config", CONFIG_KEY, blob))
            except DamagedObject as e:
                raise NotAFormat2Repository(f"storage {self.backend.name}: the repository does not open with "
                                            f"this key ({e})") from e
            ids = config.get("chunk_ids", HMAC_SHA256)  # created before chunk_ids was recorded
            if ids not in CHUNK_IDS:
                raise NotAFormat2Repository(f"storage {self.backend.name}: its chunks are named by {ids!r}, which "
                                            f"this virtwarden does not know (it knows {', '.join(CHUNK_IDS)})")
            self.codec.ids = ids
            self._config = config
        return self._config

    @property
    def chunk_size(self) -> int:
        return int(self.config["chunk_size"])

    @property
    def chunk_ids(self) -> str:
        """How the repository names its chunks (objects.CHUNK_IDS), from its config."""
        self.config  # noqa: B018 - sets self.codec.ids
        return self.codec.ids

    def domain_tag(self, domain: str) -> str:
        """The folder name of a domain's points: keyed, so it does not reveal the name."""
        secret = self.codec.key.ids if self.codec.key else b"virtwarden-unencrypted"
        return hmac.new(secret, b"domain:" + domain.encode(), hashlib.sha256).hexdigest()[:32]

    # --- points ----------------------------------------------------------------------------
    def ref(self, domain: str, point_id: str) -> PointRef:
        return PointRef(self.domain_tag(domain), point_id)

    def write_index(self, ref: PointRef, index: DiskIndex) -> str:
        """Store one disk's index (before the manifest); the SHA-256 of its encoding,
        which the manifest names."""
        data = index.encode()
        key = ref.index_key(index.target)
        self.backend.put_bytes(key, self.codec.seal("index", key, data))
        return hashlib.sha256(data).hexdigest()

    def write_manifest(self, ref: PointRef, manifest: dict) -> str:
        """Publish the point: the last write of a backup. The SHA-256 of the stored object."""
        blob = self.codec.seal("manifest", ref.manifest_key, _json(manifest))
        return self.backend.put_bytes(ref.manifest_key, blob).sha256

    def manifest(self, ref: PointRef, expected_sha256: str | None = None) -> dict:
        """The point's manifest; with ``expected_sha256`` (the catalog's record) the stored
        object must have that SHA-256."""
        try:
            blob = self.backend.get_bytes(ref.manifest_key)
        except ObjectNotFound:
            raise RestorePointNotFound(f"point {ref.point_id} is not in storage {self.backend.name}") from None
        if expected_sha256 is not None and hashlib.sha256(blob).hexdigest() != expected_sha256:
            raise DamagedObject(f"manifest {ref.manifest_key}: not the manifest the catalog recorded")
        return json.loads(self.codec.open("manifest", ref.manifest_key, blob))

    def index(self, ref: PointRef, target: str, expected_sha256: str | None = None) -> DiskIndex:
        key = ref.index_key(target)
        data = self.codec.open("index", key, self.backend.get_bytes(key))
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise DamagedObject(f"index {key}: not the index its manifest names")
        return DiskIndex.decode(data, what=f"index {key}")

    def indexes(self, ref: PointRef, manifest: dict | None = None) -> list[DiskIndex]:
        """Every disk's index of a point, each checked against its manifest."""
        manifest = manifest or self.manifest(ref)
        return [self.index(ref, d["target"], d["index_sha256"]) for d in manifest["disks"]]

    def points(self) -> Iterator[PointRef]:
        """Every published point (its manifest exists)."""
        for info in self.backend.list("points/"):
            parts = info.key.split("/")
            if len(parts) == 4 and parts[3] == "manifest":
                yield PointRef(parts[1], parts[2])

    def points_naming(self, chunks: set[str]) -> Iterator[tuple[PointRef, str]]:
        """(point, one of ``chunks`` its indexes name) for every published point naming
        any of them, whatever its domain: chunks are shared. A point that cannot be read
        (pruned meanwhile, or its manifest or an index damaged) is left out."""
        for ref in self.points():
            try:
                indexes = self.indexes(ref)
            except (ChecksumMismatch, ObjectNotFound, RestorePointNotFound):
                continue
            hit = next((cid for index in indexes for cid in sorted(chunks & index.referenced())), None)
            if hit is not None:
                yield ref, hit

    def delete_point(self, ref: PointRef) -> None:
        """Unpublish first (the manifest), then the indexes; chunks are gc's."""
        self.backend.delete(ref.manifest_key)
        for info in list(self.backend.list(ref.prefix)):
            self.backend.delete(info.key)

    # --- writers and gc exclude each other -------------------------------------------------
    # A backup names chunks it found stored without writing them again; gc must not delete
    # one of those between its listing and the backup's manifest. Both announce
    # themselves with a marker object, and each looks for the other's after writing its
    # own: whichever writes second sees the first (storage that reads its own writes,
    # as a filesystem and S3 do), so they never run at once. A backup that finds gc
    # running waits (tasks/backup_steps.announce); gc that finds a backup, or another
    # gc, defers. Every process has its own marker (one gc ending never removes
    # another's). Markers of processes that died are ignored once older than
    # ``stale_after`` by both their writer's clock and the storage's (``_fresh``), or at
    # once when they name this machine and a process that is gone.
    def begin_writing(self, what: str, *, stale_after: float = GC_STALE) -> str:
        """Announce a backup; its marker's key, for ``end_writing``. GcRunning (nothing
        written, the marker removed again) while gc runs."""
        key = f"pending/{uuid.uuid4()}"
        self._mark(key, what)
        if self._fresh(self._gc_markers(), stale_after, self._storage_now(key)):
            self.backend.delete(key)
            raise GcRunning(f"storage {self.backend.name}: gc is running")
        return key

    def renew_writing(self, key: str, what: str) -> None:
        """The backup is still alive: its marker counts as fresh again (a backup longer
        than ``WRITER_STALE`` keeps gc off only while it renews)."""
        self._mark(key, what)

    def end_writing(self, key: str) -> None:
        self.backend.delete(key)

    def writers(self, stale_after: float = WRITER_STALE, now: float | None = None) -> list[dict]:
        """Backups under way (their markers younger than ``stale_after`` seconds; ``now``:
        see ``_fresh``)."""
        return self._fresh(list(self.backend.list("pending/")), stale_after, now)

    # --- gc ---------------------------------------------------------------------------------
    def published(self) -> Iterator[tuple[PointRef, dict, list[DiskIndex]]]:
        """Every published point with its manifest and indexes, one at a time. A point
        pruned while it is read is left out; one whose index is missing while its
        manifest is there raises ObjectNotFound (its chunks cannot be known)."""
        for ref in self.points():
            try:
                manifest = self.manifest(ref)
            except RestorePointNotFound:
                continue  # pruned meanwhile
            try:
                indexes = self.indexes(ref, manifest)
            except ObjectNotFound:
                if not self.backend.exists(ref.manifest_key):
                    continue  # pruned between the two reads: manifest first, then indexes
                raise
            yield ref, manifest, indexes

    def _census(self) -> tuple[set[bytes], int, int]:
        """The chunks the published points' indexes name (each id as its 32 bytes: a set
        of hex names took twice the memory), how many points, and the bytes of those
        points' non-zero pieces."""
        used: set[bytes] = set()
        found = logical = 0
        for _ref, _manifest, indexes in self.published():  # a point whose chunks cannot be known: nothing deleted
            found += 1
            for index in indexes:
                used.update(bytes.fromhex(cid) for cid in index.referenced())
                logical += sum(length for _offset, length, cid in index.pieces() if cid is not None)
        return used, found, logical

    def usage(self) -> Usage:
        """What the points of each domain take (``virtwarden storage stats``). Memory: one
        entry per chunk the points name (its 32-byte id and the number of the group of
        domains that use it), as gc's census; the stored chunks are listed a folder at a
        time."""
        domains: dict[str, int] = {}  # name -> number
        points: list[int] = []
        logical: list[int] = []
        groups: list[tuple[int, ...]] = []  # group number -> the domains' numbers, sorted
        numbered: dict[tuple[int, ...], int] = {}
        owner: dict[bytes, int] = {}  # chunk id -> group number
        for _ref, manifest, indexes in self.published():
            d = domains.setdefault(manifest["domain"]["name"], len(domains))
            if d == len(points):
                points.append(0)
                logical.append(0)
            points[d] += 1
            alone = numbered.setdefault((d,), len(numbered))
            if alone == len(groups):
                groups.append((d,))
            for index in indexes:
                for _offset, length, cid in index.pieces():
                    if cid is None:
                        continue
                    logical[d] += length
                    cid_bytes = bytes.fromhex(cid)
                    g = owner.setdefault(cid_bytes, alone)
                    if d not in groups[g]:
                        joined = tuple(sorted((*groups[g], d)))
                        owner[cid_bytes] = numbered.setdefault(joined, len(numbered))
                        if owner[cid_bytes] == len(groups):
                            groups.append(joined)
        chunks_of = [0] * len(groups)
        for g in owner.values():
            chunks_of[g] += 1
        kept_of = [0] * len(groups)
        stored = unused = stored_bytes = 0
        for info in self.chunks.stored():
            stored += 1
            stored_bytes += info.size
            group = owner.get(_chunk_id(info.key) or b"")
            if group is None:
                unused += 1
            else:
                kept_of[group] += info.size
        per_domain = {}
        for name, d in domains.items():
            mine = [g for g, members in enumerate(groups) if d in members]
            per_domain[name] = DomainUsage(points[d], logical[d], sum(chunks_of[g] for g in mine),
                                           sum(kept_of[g] for g in mine))
        total = DomainUsage(sum(points), sum(logical), len(owner), sum(kept_of))
        return Usage(self.chunk_size, stored, unused, stored_bytes, total, dict(sorted(per_domain.items())))

    def gc(self, *, stale_writer: float = WRITER_STALE) -> GcReport:
        """Delete the chunks no published point uses, unless a backup is under way (then
        nothing, said in the report). Killed midway it has deleted only unused chunks:
        every point stays restorable, and the next run finishes the work."""
        key = f"{GC_PREFIX}{uuid.uuid4()}"
        self._mark(key, "gc")
        # Renewed from its own thread while gc runs, reading the indexes included (on a
        # large repository that alone can outlast GC_STALE): a marker gone stale in the
        # middle would let a backup name a chunk this gc is about to delete.
        done = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, done), name="gc-marker", daemon=True)
        renewer.start()
        try:
            now = self._storage_now(key)
            others = self._fresh([m for m in self._gc_markers() if m.key != key], GC_STALE, now)
            if others:
                return GcReport(0, 0, 0, 0, "another gc is running: " + ", ".join(_who(o) for o in others))
            writers = self.writers(stale_writer, now)
            if writers:
                return GcReport(0, 0, 0, 0, f"{len(writers)} backup(s) under way: "
                                f"{', '.join(sorted(w['what'] for w in writers))}")
            # No backup runs (and none starts while the gc marker is fresh): the chunks
            # a killed one left under temporary names are garbage too.
            self.backend.cleanup_incomplete("chunks/")
            used, found, logical = self._census()
            deleted = deleted_bytes = stored = stored_bytes = 0
            for info in self.chunks.stored():  # a folder's listing at a time: memory is the census's
                stored += 1
                stored_bytes += info.size
                if _chunk_id(info.key) not in used:
                    self.backend.delete(info.key)
                    deleted += 1
                    deleted_bytes += info.size
                    faults.pause_point("gc-deleting")
            markers = self._gc_markers()
            fresh = {m["key"] for m in self._fresh(markers, GC_STALE, self._storage_now(key))}
            for dead in {m.key for m in markers} - {key} - fresh:
                self.backend.delete(dead)  # of gcs that died
            return GcReport(stored, len(used), deleted, deleted_bytes, None, points=found, logical_bytes=logical,
                            stored_bytes=stored_bytes - deleted_bytes)
        finally:
            done.set()
            renewer.join()
            self.backend.delete(key)

    gc_renew_seconds = GC_STALE / 10

    def _renew(self, key: str, done: threading.Event) -> None:
        while not done.wait(self.gc_renew_seconds):
            try:
                self._mark(key, "gc")
            except StorageError:
                continue  # tried again next time; the marker counts as fresh ten times as long

    def _gc_markers(self) -> list[ObjectInfo]:
        return list(self.backend.list(GC_PREFIX))

    def _storage_now(self, key: str) -> float | None:
        """The storage's own time of the marker ``key`` this process has just written:
        "now" by the storage's clock, to which other markers' ages are compared."""
        return next((info.modified for info in self.backend.list(key) if info.key == key), None)

    def _mark(self, key: str, what: str) -> None:
        doc = {"what": what, "at": time.time(), "node": socket.gethostname(), "pid": os.getpid(),
               "pid_space": _pid_space()}
        self.backend.put_bytes(key, self.codec.seal("marker", key, _json(doc)))

    def _fresh(self, markers: list[ObjectInfo] | list[str], stale_after: float,
               now: float | None = None) -> list[dict]:
        """The markers (listed, or keys) of processes that may be alive, each with its
        ``key``. A marker is fresh when younger than ``stale_after`` by its writer's clock
        (the time in it, against this machine's) or by the storage's (when it was last
        written, against ``now``: the storage's time of a marker this process has just
        written). Either suffices, so a writer whose clock runs behind ours by more than
        ``stale_after`` is not taken for dead while it renews its marker (a gc on such a
        host would otherwise delete chunks a backup here has just found stored)."""
        out = []
        for marker in markers:
            info = marker if isinstance(marker, ObjectInfo) else ObjectInfo(marker, 0)
            try:
                doc = json.loads(self.codec.open("marker", info.key, self.backend.get_bytes(info.key)))
            except (ObjectNotFound, DamagedObject):
                continue  # removed meanwhile, or not ours
            young = time.time() - float(doc["at"]) < stale_after
            if not young and now is not None and info.modified is not None:
                young = now - info.modified < stale_after
            if young and _may_live(doc):
                out.append({**doc, "key": info.key})
        return out


@functools.cache
def _pid_space() -> str:
    """This process's PID namespace on this boot: process ids mean the same process only
    within one (a container with the host's name has its own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _may_live(marker: dict) -> bool:
    """False only for a marker of a process of this machine (same name, boot and PID
    namespace) that is gone."""
    same = marker.get("node") == socket.gethostname() and marker.get("pid_space") and \
        marker.get("pid_space") == _pid_space()
    if not same or not isinstance(marker.get("pid"), int):
        return True
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _who(marker: dict) -> str:
    return f"{marker.get('what')} on {marker.get('node', '?')} (pid {marker.get('pid', '?')})"


def _json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _chunk_id(key: str) -> bytes | None:
    """The 32-byte id a chunk object's name spells; None for a name that is not one."""
    try:
        cid = bytes.fromhex(key.rsplit("/", 1)[1])
    except ValueError:
        return None
    return cid if len(cid) == 32 else None
