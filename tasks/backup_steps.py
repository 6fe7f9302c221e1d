"""The steps both backup strategies share (``tasks.backup``: bitmap, ``tasks.blockcommit``):
the request, full or incremental (``plan_level``, a pure function), where each disk's
image is written (``plan_outputs``) and whether it fits (``check_space``), storing the
images (``store_images``), the manifest (``build_manifest``), completing the point
(``complete_point``) and undoing a failed one (``undo_point``).

``complete_point`` and ``undo_point`` act only for the attempt that still owns the job
(catalog/fencing.py), and ``undo_point`` removes data only of a point it moved from
writing to failed: a worker that lost the job, or that cannot tell whether its last
commit went through, touches nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from virtwarden.catalog import points, repositories
from virtwarden.catalog.points import ArtifactView, PointView
from virtwarden.hypervisor import qemu_img
from virtwarden.hypervisor.nbd import ImageExport, NbdReader
from virtwarden.hypervisor.types import DomainInfo
from virtwarden.storage_backends.format2.index import DiskIndex
from virtwarden.storage_backends.format2.repository import WRITER_STALE, Format2Repository, GcRunning, PointRef
from virtwarden.storage_backends.format2.store import LostChunk, write_disk
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks import recovery
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.verify import take_out_of_service

from virtwarden import faults
from virtwarden.errors import (
    DatabaseUnavailable,
    HypervisorError,
    LeaseLost,
    NoSpace,
    ToolFailed,
    Transient,
    VirtwardenError,
)
from virtwarden.nbd_protocol import BASE_ALLOCATION

log = logging.getLogger(__name__)
COMMIT_RECHECK_SECONDS = 120.0  # how long a lost commit answer is chased before giving up
RENEWAL_JOIN_SECONDS = 120.0  # how long close() waits for a gc-marker renewal in flight


@dataclass(frozen=True)
class BackupRequest:
    domain: str
    storage: str
    strategy: str = "bitmap"  # or "blockcommit"
    full_every: int = 7  # incrementals after a full before the next full
    force_full: bool = False
    policy: str | None = None
    # The policy's backup.retention (policies.model.Retention as data): applied to this
    # domain's chain group after each successful backup.
    retention: dict | None = None
    # Freeze the guest's filesystems for the copy's instant: auto | always | never
    # (tasks.quiesce).
    quiesce: str = "auto"


class ParentDamaged(Transient):
    """A format-2 incremental met a chunk of the point it builds on damaged or missing:
    the attempt fails, and the next one, its parent out of service, is a full."""


class ParentGone(Transient):
    """The point a format-2 incremental builds on went between planning and the backup's
    gc marker: the attempt fails before anything is stored, the next one plans again."""


@dataclass(frozen=True)
class LevelPlan:
    level: str  # full | incremental
    reason: str
    parent: PointView | None = None
    # Format 2: look up every chunk in storage (an operator's --full, a full_every full),
    # not only those the last point does not name (PointSink._stored_ids).
    recheck: bool = False


def plan_level(req: BackupRequest, dom: DomainInfo, head: PointView | None, checkpoints: set[str],
               restored: str | None = None, damaged: PointView | None = None) -> LevelPlan:
    """Full or incremental, and why. Pure: decided from the catalog's chain head, the
    checkpoints libvirt still has, ``restored``: why the disks were replaced by a
    restore in place since the head, if they were, and ``damaged``: a point of the
    head's chain (or after it) that a verification found damaged, if any."""
    if req.force_full:
        return LevelPlan("full", "full backup requested", recheck=True)
    if damaged is not None:
        return LevelPlan("full", f"restore point {damaged.id} of the last chain is damaged ({damaged.damage}); "
                                 "starting a new chain")
    if head is None:
        return LevelPlan("full", "no earlier backup of this domain on this target")
    if restored:
        return LevelPlan("full", restored)
    if head.seq >= req.full_every:
        return LevelPlan("full", f"chain reached full_every={req.full_every} incrementals", recheck=True)
    if not head.checkpoint:
        return LevelPlan("full", "the last backup was made while the domain was shut off (no checkpoint to "
                                 "continue from); starting a new chain")
    if head.checkpoint not in checkpoints:
        return LevelPlan("full", f"checkpoint {head.checkpoint} of the last backup is gone "
                                 "(domain redefined or migrated, or its bitmaps were lost); starting a new chain")
    before = {a.target: a.virtual_size for a in head.artifacts}
    now = {d.target: d.virtual_size for d in dom.disks}
    if set(before) != set(now):
        return LevelPlan("full", f"disks changed since the last backup ({sorted(before)} -> {sorted(now)})")
    resized = [t for t in now if before[t] != now[t]]
    if resized:
        return LevelPlan("full", f"disk {', '.join(resized)} was resized since the last backup")
    return LevelPlan("incremental", f"changes since {head.checkpoint}", head)


def restored_since(ctx: JobContext, dom: DomainInfo, head: PointView | None) -> str | None:
    """Why the chain ``head`` ends, when the domain was restored in place after it."""
    from virtwarden.tasks.restore import restored_in_place_reason

    return restored_in_place_reason(ctx.catalog, dom.name, dom.uuid, head.created_at) if head else None


@dataclass(frozen=True)
class Output:
    """Where libvirt writes one disk's image, and where that place is, for messages."""

    key: str
    path: Path
    staged: bool  # made in place on the target's own filesystem (NFS), not in scratch
    place: str


def plan_outputs(ctx: JobContext, repo: Repository, prefix: str, dom: DomainInfo, storage: str, *,
                 scratch_only: bool = False) -> dict[str, Output]:
    """Images go straight onto a mounted target when it can take them (no second copy);
    otherwise (or ``scratch_only``: format 2 stores chunks, never the image) into this
    job's scratch directory, to be uploaded."""
    out = {}
    for d in dom.disks:
        key = repo.artifact_key(prefix, d.target)
        staged = None if scratch_only else repo.backend.stage(key)
        if staged is not None:
            out[d.target] = Output(key, staged, True, f"storage {storage!r} ({staged.parent})")
        else:
            out[d.target] = Output(key, ctx.scratch / f"{d.target}.qcow2", False,
                                    f"scratch directory {ctx.scratch_root}")
    return out


def check_space(dom: DomainInfo, plan: LevelPlan, outputs: dict[str, Output]) -> None:
    """A full copy needs room for every disk's data: refuse early rather than fill a
    filesystem halfway."""
    if plan.level != "full":
        return
    need: dict[Path, int] = {}
    for d in dom.disks:
        where = outputs[d.target].path.parent
        with contextlib.suppress(Exception):  # an estimate only; the copy itself will tell
            need[where] = need.get(where, 0) + int(qemu_img.info(Path(d.path)).get("actual-size", 0))
    for where, size in need.items():
        free = free_bytes(where)
        if size > free:
            place = next(o.place for o in outputs.values() if o.path.parent == where)
            raise NoSpace(f"{place} has {free} bytes free; a full backup of {dom.name!r} needs about {size}")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def store_images(ctx: JobContext, repo: Repository, outputs: dict[str, Output]) -> list[ArtifactView]:
    out = []
    total = sum(os.path.getsize(o.path) for o in outputs.values()) or 1
    sent = 0
    for target, o in outputs.items():
        qemu_img.detach_backing(o.path)  # libvirt names the live disk as backing: never keep that
        virtual = int(qemu_img.info(o.path)["virtual-size"])
        base = sent

        def moved(n: int, base: int = base, target: str = target) -> None:
            ctx.report(0.6 + 0.39 * (base + n) / total, f"storing {target}: {(base + n) >> 20} MiB")
            faults.pause_point("storing")  # mid-upload: some of the image is stored, not all

        if o.staged:
            stored = repo.backend.publish_staged(o.key, o.path, progress=moved)
        else:
            stored = repo.backend.put_file(o.key, o.path, progress=moved)
        sent += stored.size
        out.append(ArtifactView(target, o.key, stored.size, stored.sha256, virtual))
    return out


class PointSink:
    """Where one backup's point goes, in the format of its storage target: format 1 (a
    qcow2 image per disk, chained to its parent) or format 2 (chunks and an index per
    disk; ``repo2``). Both strategies make their point through it: ``lineage`` for the
    catalog row, ``outputs`` for the images, ``store`` and ``publish`` after the copy,
    ``remove`` to undo, ``close`` at the end whatever happened."""

    def __init__(self, ctx: JobContext, storage: str, dom: DomainInfo, point_id: str, plan: LevelPlan) -> None:
        self.repo = Repository(ctx.storage(storage))
        self.repo2 = ctx.repository(storage)
        self.storage = storage
        self.previous: dict[str, DiskIndex] = {}
        # Format 2 (set by begin()): ids of chunks certainly stored, not looked up again,
        # and of chunks found damaged and left in storage, stored again when produced.
        self.known: frozenset[str] = frozenset()
        self.damaged: frozenset[str] = frozenset()
        self._catalog, self._domain = ctx.catalog, dom.name
        self.plan = plan
        self._writing: str | None = None
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None
        self.renew_seconds = WRITER_STALE / 10
        if self.repo2 is None:
            parent = plan.parent
            chain_id = parent.chain_id if parent else str(uuid.uuid4())
            self.prefix = self.repo.point_prefix(dom.name, chain_id, point_id)
            self.manifest_key = self.repo.manifest_key(self.prefix)
            self.lineage: dict = {"chain_id": chain_id, "parent_id": parent.id if parent else None,
                                  "seq": parent.seq + 1 if parent else 0}
            return
        # Every format-2 point is complete on its own: a chain of one, which retention
        # may delete whatever comes after it.
        self.plan, self.previous = _format2_plan(self.repo2, plan)
        self.ref = self.repo2.ref(dom.name, point_id)
        self.prefix, self.manifest_key = self.ref.prefix, self.ref.manifest_key
        self.lineage = {"chain_id": point_id, "parent_id": None, "seq": 0, "format": 2}

    def begin(self, what: str, waiting: Callable[[str], None] | None = None) -> None:
        """Before anything is stored: a format-2 repository's gc keeps off until ``close``
        (the marker renewed every ``renew_seconds`` meanwhile, however long the backup).
        While a gc runs, the backup waits for it to end (``waiting`` is told why)."""
        if self.repo2 is None:
            return
        repo2 = self.repo2
        key = self._writing = announce(repo2, what, waiting)
        parent = self.plan.parent
        if self.previous and parent is not None and not repo2.backend.exists(repo2.ref(parent.domain,
                                                                                     parent.id).manifest_key):
            # Its indexes were read before the marker: a prune and a gc in between may
            # have collected chunks this incremental would name without reading them.
            raise ParentGone(f"point {parent.id}, which this incremental builds on, was deleted as the backup "
                             "began; tried again")
        self.known = self._stored_ids(repo2)
        self.damaged = repositories.damaged_chunks(self._catalog, self.storage)

        def renew() -> None:
            while not self._done.wait(self.renew_seconds):
                try:
                    repo2.renew_writing(key, what)
                except VirtwardenError as e:  # tried again next time; gc honours the marker a day
                    log.warning("%s: renewing its marker for gc: %s", what, e)

        self._renewer = threading.Thread(target=renew, name="gc-marker", daemon=True)
        self._renewer.start()

    def _stored_ids(self, repo2: Format2Repository) -> frozenset[str]:
        """The chunks of the domain's last complete point in this repository (an
        incremental's parent, whose indexes it builds on anyway; for a full, the last
        point, read now): certainly stored, since this backup's marker keeps gc off and a
        point whose indexes can be read keeps its chunks (verify marks every point that
        names a chunk it lost). A full that reads everything again (a lost bitmap, a
        damaged point, a new chain) then looks up only what changed in storage, instead of
        every chunk: on S3 a HEAD request each. A full the operator asked for
        (``--full``) or one of ``full_every`` (``LevelPlan.recheck``) looks up every
        chunk: it stores again whatever storage lost without anyone noticing yet."""
        if self.previous:
            return frozenset(cid for index in self.previous.values() for cid in index.referenced())
        if self.plan.recheck:
            return frozenset()
        done = points.for_domain(self._catalog, self._domain, storage=self.storage, statuses=(points.COMPLETE,))
        last = next((p for p in reversed(done) if p.format == 2), None)
        if last is None:
            return frozenset()
        try:
            indexes = repo2.indexes(repo2.ref(last.domain, last.id))
        except VirtwardenError as e:  # pruned meanwhile, or unreadable: every chunk is looked up
            log.info("%s: the chunks of point %s are looked up one by one (%s)", self._domain, last.id, e)
            return frozenset()
        return frozenset(cid for index in indexes for cid in index.referenced())

    def outputs(self, ctx: JobContext, dom: DomainInfo) -> dict[str, Output]:
        return plan_outputs(ctx, self.repo, self.prefix, dom, self.storage, scratch_only=self.repo2 is not None)

    def store_in_place(self, ctx: JobContext, dom: DomainInfo) -> list[ArtifactView] | None:
        """A shut-off domain's disks stored without a copy (format 2); None: copy them
        into ``outputs`` first and ``store`` those (format 1 stores the images)."""
        if self.repo2 is None:
            return None
        return store_chunks_in_place(ctx, self.repo2, self.ref, dom, self.known, self.damaged)

    def store_pulled(self, ctx: JobContext, dom: DomainInfo, socket: str, incremental: set[str]) -> list[ArtifactView]:
        """Format 2 only: the disks read from a running pull-mode backup's NBD export."""
        assert self.repo2 is not None
        return store_chunks_pulled(ctx, self.repo2, self.ref, dom, socket,
                                   {t: self.previous[t] for t in incremental if t in self.previous}, self.known,
                                   self.damaged)

    def store(self, ctx: JobContext, dom: DomainInfo, outputs: dict[str, Output],
              incremental: set[str]) -> list[ArtifactView]:
        """The images stored; ``incremental``: the disks whose image holds only changes."""
        if self.repo2 is None:
            return store_images(ctx, self.repo, outputs)
        try:
            return store_chunks(ctx, self.repo2, self.ref, dom, outputs, {t: self.previous[t] for t in incremental
                                                                           if t in self.previous}, self.known,
                                self.damaged)
        except LostChunk as e:
            # The last point cannot be restored either: out of service with every point
            # naming the chunk (as verify would), and the next attempt plans a full.
            if take_out_of_service(ctx, self.repo2, self.storage, {e.chunk}, f"backup job {ctx.job_id}"):
                raise ParentDamaged(f"{e}; the points using it are taken out of service, the next attempt reads "
                                    "every disk whole") from e
            raise ParentDamaged(f"{e}; it read intact the second time (damaged on its way): trying again") from e

    def publish(self, manifest: dict, artifacts: list[ArtifactView]) -> str:
        """The manifest, last; its SHA-256 as stored."""
        if self.repo2 is None:
            return self.repo.write_manifest(self.prefix, manifest)
        return self.repo2.write_manifest(self.ref, format2_manifest(manifest, artifacts))

    def remove(self) -> None:
        if self.repo2 is None:
            recovery.remove_point_data(self.repo, self.prefix)
        else:
            self.repo2.delete_point(self.ref)

    def close(self) -> None:
        self._done.set()
        if self._renewer is not None:
            # A renewal in flight would write the marker again after end_writing removed
            # it, and gc would then wait for a backup that has ended (a day, until the
            # marker is stale). A renewal is one small write, bounded by the backend's
            # own timeouts.
            self._renewer.join(RENEWAL_JOIN_SECONDS)
            if self._renewer.is_alive():
                log.warning("the gc marker's renewal has not returned after %.0fs; the marker may stay until "
                            "it is stale", RENEWAL_JOIN_SECONDS)
            self._renewer = None
        if self.repo2 is not None and self._writing is not None:
            self.repo2.end_writing(self._writing)
            self._writing = None


def _format2_plan(repo2: Format2Repository, plan: LevelPlan) -> tuple[LevelPlan, dict[str, DiskIndex]]:
    """A format-2 incremental reads only what changed and takes the rest from the
    previous point's indexes; without them (the previous point is of format 1, or its
    indexes do not open) the backup reads everything, and says why."""
    if plan.level != "incremental" or plan.parent is None:
        return plan, {}
    parent = plan.parent
    if parent.format != 2:
        return LevelPlan("full", "first backup in repository format 2 (the format-1 chain before it stays "
                                 "readable)"), {}
    try:
        indexes = repo2.indexes(repo2.ref(parent.domain, parent.id))
    except VirtwardenError as e:
        return LevelPlan("full", f"the indexes of point {parent.id} cannot be read ({e}); reading every disk "
                                 "whole"), {}
    return plan, {i.target: i for i in indexes}


def store_chunks(ctx: JobContext, repo2: Format2Repository, ref: PointRef, dom: DomainInfo,
                 outputs: dict[str, Output], previous: dict[str, DiskIndex],
                 known: frozenset[str] = frozenset(), damaged: frozenset[str] = frozenset()) -> list[ArtifactView]:
    """Format 2: each disk's image into chunks and an index. ``previous``: for each disk
    whose image holds only what changed (a push-mode incremental target, a blockcommit
    overlay), the last point's index of that disk; only the image's ranges are read
    (incremental forever). The artifacts name each disk's index, the bytes stored anew,
    and the index's SHA-256."""
    out = []
    for n, (target, o) in enumerate(outputs.items()):
        qemu_img.detach_backing(o.path)  # libvirt names the live disk as backing: never read through it
        with qemu_img.ImageData(o.path) as img:
            out.append(_store_disk(ctx, repo2, ref, dom, target, img, previous.get(target), n / len(outputs),
                                   whole=False, known=known, damaged=damaged))
    return out


def store_chunks_in_place(ctx: JobContext, repo2: Format2Repository, ref: PointRef,
                          dom: DomainInfo, known: frozenset[str] = frozenset(),
                          damaged: frozenset[str] = frozenset()) -> list[ArtifactView]:
    """Format 2, a shut-off domain: each disk read where it is, through a read-only
    ``qemu-nbd`` export (hypervisor/nbd.py), never copied into scratch. qemu-nbd holds
    the image as ``qemu-img convert`` would: the domain cannot start meanwhile."""
    out = []
    for n, d in enumerate(dom.disks):
        try:
            with ImageExport(Path(d.path), d.format, ctx.scratch) as img:
                out.append(_store_disk(ctx, repo2, ref, dom, d.target, img, None, n / len(dom.disks), whole=True,
                                       known=known, damaged=damaged))
        except ToolFailed as e:
            if "lock" in str(e):
                raise HypervisorError(f"disk {d.target} of {dom.name!r} is in use (was the domain started?): "
                                      f"{e}; the next run backs it up online") from e
            raise
    return out


def store_chunks_pulled(ctx: JobContext, repo2: Format2Repository, ref: PointRef, dom: DomainInfo, socket: str,
                        previous: dict[str, DiskIndex], known: frozenset[str] = frozenset(),
                        damaged: frozenset[str] = frozenset()) -> list[ArtifactView]:
    """Format 2, a pull-mode backup running: each disk read over QEMU's NBD export of it
    (the disk as it was when the backup began), never copied into scratch. ``previous``
    as for ``store_chunks``: for those disks only the ranges their dirty bitmap names
    (the export's ``qemu:dirty-bitmap:backup-<disk>`` context) are read."""
    out = []
    for n, d in enumerate(dom.disks):
        prev = previous.get(d.target)
        dirty = f"qemu:dirty-bitmap:backup-{d.target}".encode()
        reader = NbdReader(socket, d.target, (BASE_ALLOCATION, dirty) if prev else (BASE_ALLOCATION,))
        try:
            out.append(_store_disk(ctx, repo2, ref, dom, d.target, _Pulled(reader, dirty if prev else None), prev,
                                   n / len(dom.disks), whole=True, known=known, damaged=damaged))
        finally:
            reader.close()
    return out


class _Pulled:
    """A disk of a pull-mode backup: what ``_store_disk`` reads. ``held``: for an
    incremental (``dirty``, the bitmap's context) what changed, for a full what holds
    data (holes and zeros are neither read nor stored)."""

    def __init__(self, reader: NbdReader, dirty: bytes | None) -> None:
        self.reader, self.dirty = reader, dirty
        self.virtual_size = reader.virtual_size
        self.read = reader.read

    def held(self) -> list[tuple[int, int]]:
        if self.dirty is None:
            return self.reader.held()
        if not self.reader.offers(self.dirty):  # no bitmap exported: read it all, store what changed
            log.warning("the NBD export offers no %s: reading the whole disk (only changed chunks are stored)",
                        self.dirty.decode())
            return [(0, self.virtual_size)]
        return self.reader.ranges(self.dirty, lambda flags: bool(flags & 1))  # 1: dirty


class _DiskData(Protocol):
    virtual_size: int

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def held(self) -> list[tuple[int, int]]: ...


def _store_disk(ctx: JobContext, repo2: Format2Repository, ref: PointRef, dom: DomainInfo, target: str,
                img: _DiskData, previous: DiskIndex | None, done: float, *, whole: bool,
                known: frozenset[str] = frozenset(), damaged: frozenset[str] = frozenset()) -> ArtifactView:
    """One disk into chunks and an index. ``img.held()``: with ``previous``, the ranges
    changed since it; without, the ranges that hold data (the rest is zeros). ``whole``:
    ``img`` reads as the whole disk, so a chunk a change touches is read from it whole
    rather than laid over the previous point's chunk. ``known`` and ``damaged``:
    ``PointSink``'s. A damaged chunk stored again is durable and intact when
    ``write_disk`` returns, whatever becomes of this backup: its row goes then."""
    ctx.report(0.6 + 0.39 * done, f"storing {target} as chunks")
    index, stats = write_disk(repo2.chunks, target, img.read, img.virtual_size, repo2.chunk_size,
                              previous=previous, changed=img.held(), whole=whole, known=known, damaged=damaged)
    if stats.repaired:
        repositories.clear_damaged_chunks(ctx.catalog, repo2.backend.name, stats.repaired)
        log.warning("job %s: %s of %s: %d chunk(s) found damaged earlier stored again: %s", ctx.job_id, target,
                    dom.name, len(stats.repaired), ", ".join(sorted(stats.repaired)))
    faults.pause_point("storing")
    sha = repo2.write_index(ref, index)
    log.info("job %s: %s of %s: %d MiB read, %d chunk(s) stored (%d MiB), %d already stored, %d reused, "
             "%d zero", ctx.job_id, target, dom.name, stats.read_bytes >> 20, stats.stored_chunks,
             stats.stored_bytes >> 20, stats.known_chunks, stats.reused_chunks, stats.zero_chunks)
    return ArtifactView(target, ref.index_key(target), stats.stored_bytes, sha, index.virtual_size)


def format2_manifest(manifest: dict, artifacts: list[ArtifactView]) -> dict:
    """A format-1 manifest (``build_manifest``) as format 2 has it: the point complete on
    its own (no chain, no parent) and each disk named by its index's SHA-256."""
    kept = {k: v for k, v in manifest.items() if k not in ("chain_id", "parent_id", "seq", "disks")}
    source = {d["target"]: d.get("source") for d in manifest["disks"]}
    return {**kept, "format": 2, "point_id": manifest["point_id"],
            "disks": [{"target": a.target, "virtual_size": a.virtual_size, "index_sha256": a.sha256,
                       "stored_bytes": a.size_bytes, "source": source[a.target]} for a in artifacts]}


def build_manifest(ctx: JobContext, dom: DomainInfo, point: PointView, plan: LevelPlan, checkpoint: str | None,
              artifacts: list[ArtifactView], checkpoint_xml: str, *, consistency: str = "crash") -> dict:
    modes = {d.target: ("incremental" if plan.level == "incremental" and d.has_bitmaps else "full")
             for d in dom.disks}
    # Without libvirt's secure flag: a restore point never holds a graphics password.
    xml = ctx.require_hypervisor().inactive_xml(dom.name, secure=False)
    return {
        "point_id": point.id, "chain_id": point.chain_id, "parent_id": point.parent_id,
        "seq": point.seq, "level": point.level, "strategy": point.strategy, "reason": plan.reason,
        "consistency": consistency, "host": point.host,
        "created_at": point.created_at.isoformat(),
        "completed_at": datetime.now(UTC).isoformat(),
        "domain": {"name": dom.name, "uuid": dom.uuid, "xml": xml},
        "checkpoint": {"name": checkpoint, "xml": checkpoint_xml} if checkpoint else None,
        "disks": [{"target": a.target, "mode": modes[a.target], "format": "qcow2", "key": a.key,
                   "size_bytes": a.size_bytes, "sha256": a.sha256, "virtual_size": a.virtual_size,
                   "source": dom.disk(a.target).path} for a in artifacts],
    }


def complete_point(ctx: JobContext, point_id: str, artifacts: list[ArtifactView], *, consistency: str,
                   manifest_sha256: str | None) -> PointView:
    """Mark the point complete. When the database fails around the commit, the outcome is
    unknown (the UPDATE may have committed and only its answer been lost), so the point
    is read again, for up to ``COMMIT_RECHECK_SECONDS``, before anything is undone: a
    point the catalog lists as complete keeps its data whatever the error said."""
    try:
        return points.complete(ctx.catalog, point_id, artifacts, consistency=consistency,
                               manifest_sha256=manifest_sha256)
    except DatabaseUnavailable as e:
        log.warning("job %s: completing point %s: %s; reading it again before deciding", ctx.job_id, point_id, e)
        first = e
    deadline = time.monotonic() + COMMIT_RECHECK_SECONDS
    while True:
        try:
            now = points.get(ctx.catalog, point_id)
            if now.status == points.COMPLETE:
                log.info("job %s: point %s was completed (the commit's answer was lost)", ctx.job_id, point_id)
                return now
            return points.complete(ctx.catalog, point_id, artifacts, consistency=consistency,
                                   manifest_sha256=manifest_sha256)
        except DatabaseUnavailable as e:
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"point {point_id}: the catalog could not be reached to complete it "
                                          f"({first}; {e}); it stays unlisted") from e
            time.sleep(1.0)


GC_PATIENCE = 1800.0  # seconds a backup waits for a running gc before this attempt gives up


def announce(repo2: Format2Repository, what: str, waiting: Callable[[str], None] | None = None, *,
             patience: float = GC_PATIENCE, every: float = 2.0) -> str:
    """Announce a backup to the repository's gc (its marker's key). A gc that runs (gc
    started automatically after a prune, a large repository: minutes) is waited for, up
    to ``patience`` seconds, looking again every ``every``: failing the attempt at once
    would spend the job's retries on a wait (three attempts, 30 and 60 s apart, fail a
    backup that meets a five-minute gc). A gc that died leaves a marker that goes stale
    within ten minutes. GcRunning once the patience is spent."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return repo2.begin_writing(what)
        except GcRunning as e:
            if time.monotonic() + every > deadline:
                raise GcRunning(f"{e} (waited {patience:.0f} s); the backup tries again later") from e
            if waiting is not None:
                waiting(str(e))
            time.sleep(every)


def undo_point(ctx: JobContext, repo: Repository, domain: str, point_id: str, prefix: str,
               checkpoint: str | None, error: BaseException, *, remove: Callable[[], None] | None = None) -> None:
    """Leave nothing half-done: the point failed, its pieces and checkpoint removed, but
    only by the attempt that still owns the job, and the data only of a point this call
    moved from writing to failed (never of one the catalog lists as complete). When
    that cannot be known (lease lost, catalog unreachable) nothing is touched: the
    next attempt's recovery, or the sweep of unfinished points, does it. ``remove``
    removes the point's stored data (default: everything under ``prefix``)."""
    if isinstance(error, LeaseLost):
        return
    hv = ctx.require_hypervisor()
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    try:
        ctx.ensure_owner(f"clean up after the failed backup of {domain}")
        failed_now = points.fail(ctx.catalog, point_id, reason)
    except (LeaseLost, VirtwardenError) as e:
        log.warning("domain %s job %s: not cleaning up point %s now (%s); recovery will", domain, ctx.job_id,
                    point_id, e)
        return
    if not failed_now:
        log.warning("domain %s job %s: point %s is not being written any more; its data stays", domain,
                    ctx.job_id, point_id)
        return
    for step in (lambda: hv.abort_job(domain) if checkpoint and hv.has_active_job(domain) else None,
                 lambda: hv.delete_checkpoint(domain, checkpoint) if checkpoint else None,
                 remove or (lambda: recovery.remove_point_data(repo, prefix))):
        try:
            ctx.ensure_owner(f"clean up after the failed backup of {domain}")
            step()
        except LeaseLost:
            return
        except Exception as cleanup_error:  # noqa: BLE001 - report, keep cleaning
            log.warning("domain %s job %s: cleanup after failure: %s", domain, ctx.job_id, cleanup_error)
