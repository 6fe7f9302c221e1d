"""Restore a point: choosing it, reading and verifying its chain, rebuilding its disks;
and the restore into a directory (one flat image per disk, named after its target).

Choosing a point (``resolve_point``): ``latest``, a point id, or ``at`` a time: the last
complete point whose backup started at or before that time (a point holds the disks as
they were when its backup started). A time without a zone is the local time of the
machine that reads it (the one running the command or the API).

The chain (the full and every incremental up to the point) is read from the catalog and
checked against the manifests in storage (``load_chain``); every artifact a disk needs
is copied into the job's scratch space, from a mounted filesystem or S3 alike, and its
SHA-256 verified over exactly the bytes copied, before anything is written (``fetched``).
``qemu-img convert`` then reads each disk's layers, those copies, as one chain
(described on its command line) and writes one standalone image, which appears under
its final name only when complete (``rebuild_new``, ``rebuild``). So a restore uses
only bytes it hashed: an artifact changed on storage after its check cannot reach the
image. A format-2 point is not copied: each disk is served over NBD from its chunks,
each chunk authenticated as it is read (``served_disks``), and ``qemu-img convert``
reads it from there. The restores as a new domain and in place
(tasks/restore_domain.py) and drills use the same steps.

Disk targets come from the catalog: a manifest that names other targets than the
point's catalog rows is refused, and so is a target that is not a disk name (they are
file names). A restore into a directory writes only under ``restore.allowed_dirs``
when the API or a runbook asked for it, into a new or empty directory, and creates
every file exclusively (tasks/confine.py).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from virtwarden.catalog import jobs, points
from virtwarden.catalog.points import PointView
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor import qemu_img
from virtwarden.hypervisor.domxml import redact
from virtwarden.storage_backends.base import Backend
from virtwarden.storage_backends.format2.index import DiskIndex
from virtwarden.storage_backends.format2.nbd import ChunkExport
from virtwarden.storage_backends.format2.objects import DamagedObject
from virtwarden.storage_backends.format2.repository import Format2Repository
from virtwarden.storage_backends.format2.store import ChunkStore
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.confine import PRIVATE_DIR, NewDir, check_target, confine
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.verify import take_out_of_service

from virtwarden import faults
from virtwarden.errors import (
    EXIT_USAGE,
    ChecksumMismatch,
    NoSpace,
    ObjectNotFound,
    RestorePointNotFound,
    RestoreRefused,
    StorageError,
    StorageUnavailable,
    ToolFailed,
)

log = logging.getLogger(__name__)

# The job kind of a restore in place; a backup after one starts a new chain and says so.
IN_PLACE_KIND = "restore-in-place"


class InvalidRestoreRequest(RestoreRefused):
    """Options that do not go together, or a time that cannot be read."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class RestoreRequest:
    domain: str
    point: str  # a point id, or "latest"
    to_dir: str
    storage: str | None = None  # with "latest": only points on this target
    # to_dir must be under the worker's restore.allowed_dirs. False only for a restore
    # root started from the command line (and a drill's, into its own scratch space); a
    # job row without the field is confined.
    confined: bool = True


# --- choosing the point -------------------------------------------------------------
def parse_time(value: str | datetime) -> datetime:
    """An ISO 8601 time as an aware UTC datetime. Without a zone it is local time."""
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidRestoreRequest(
                f"{value!r} is not an ISO 8601 time; write e.g. 2025-03-30T14:00 (local time), "
                "2025-03-30T14:00+02:00 or 2025-03-30T12:00Z") from None
    if when.tzinfo is None:
        when = when.astimezone()  # the machine's local time zone
    return when.astimezone(UTC)


def utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def resolve_point(cat: Catalog, domain: str, point: str = "latest", storage: str | None = None, *,
                  at: str | datetime | None = None) -> PointView:
    """The point to restore: ``point`` (an id or "latest"), or the last complete point
    at or before ``at``."""
    point = point or "latest"
    if at not in (None, ""):
        if point != "latest":
            raise InvalidRestoreRequest("give a restore point or a time (--at), not both")
        return _point_at(cat, domain, parse_time(at), storage)  # type: ignore[arg-type]
    if point != "latest":
        found = points.get(cat, point)
        if found.domain != domain:
            raise RestorePointNotFound(f"restore point {point} belongs to {found.domain!r}, not {domain!r}")
        return found
    usable = points.for_domain(cat, domain, storage=storage, statuses=(points.COMPLETE,))
    if not usable:
        raise RestorePointNotFound(f"domain {domain!r} has no complete restore point"
                                   + (f" on storage {storage!r}" if storage else ""))
    return usable[-1]


def _point_at(cat: Catalog, domain: str, when: datetime, storage: str | None) -> PointView:
    usable = points.for_domain(cat, domain, storage=storage, statuses=(points.COMPLETE,))
    before = [p for p in usable if p.created_at <= when]
    if before:
        return before[-1]
    if not usable:
        raise RestorePointNotFound(f"domain {domain!r} has no complete restore point"
                                   + (f" on storage {storage!r}" if storage else ""))
    first = usable[0]
    raise RestorePointNotFound(f"domain {domain!r} has no complete restore point at or before {utc_text(when)}; "
                               f"the first one is {first.id}, made {utc_text(first.created_at)}")


def describe_selection(point: str, at: str | datetime | None) -> str:
    if at not in (None, ""):
        return f"the last complete point at or before {utc_text(parse_time(at))}"
    return "the latest complete point" if point in ("latest", "", None) else "chosen by id"


# --- the chain ------------------------------------------------------------------------
@dataclass(frozen=True)
class Chain:
    """The chosen point, the points it is built on (full first) and their manifests."""

    points: list[PointView]
    manifests: list[dict]
    # A format-2 point's repository (its disks are read from chunks); None for format 1.
    repo2: Format2Repository | None = None

    @property
    def point(self) -> PointView:
        return self.points[-1]

    @property
    def saved_xml(self) -> str:
        """The domain XML saved with the point, without graphics passwords (points made
        before backups stopped recording them still hold them; nothing uses them)."""
        return redact(str(self.manifests[-1]["domain"]["xml"]))


def _format1_only(_storage: str) -> Format2Repository | None:
    return None


def point_manifest(point: PointView, backend: Backend,
                   repository: Callable[[str], Format2Repository | None] = _format1_only) -> dict:
    """A point's manifest as stored: trusted only when its stored bytes have the SHA-256
    the catalog recorded (points made before manifests were checksummed have none).
    ``repository`` opens a storage's format-2 repository (``JobContext.repository``):
    a format-2 point's manifest comes in the shape the restore steps read."""
    if point.format == 2:
        return _format2_manifest(_format2_repository(point, repository), point)
    return Repository(backend).read_manifest(point.manifest_key, expected_sha256=point.manifest_sha256)


def load_chain(cat: Catalog, backend: Backend, point: PointView,
               repository: Callable[[str], Format2Repository | None] = _format1_only) -> Chain:
    """The point's chain from the catalog, with each point's manifest (``point_manifest``),
    which must name the artifacts the catalog has. ChecksumMismatch before anything is
    read further or written. A format-2 point is a chain of one."""
    if point.format == 2:
        repo2 = _format2_repository(point, repository)
        manifest = _format2_manifest(repo2, point)
        _check_matches_catalog([point], [manifest])
        return Chain([point], [manifest], repo2)
    chain = points.chain_to(cat, point.id)
    manifests = [point_manifest(p, backend) for p in chain]
    _check_matches_catalog(chain, manifests)
    return Chain(chain, manifests)


def _format2_repository(point: PointView, repository: Callable[[str], Format2Repository | None]) -> Format2Repository:
    repo2 = repository(point.storage)
    if repo2 is None:
        raise StorageError(f"restore point {point.id} is in repository format 2, and storage {point.storage} "
                           "is not configured for it (format: 2 and its key_file)")
    return repo2


def layers_for(chain: list[dict], target: str) -> list[dict]:
    """The disk entries to stack for ``target``, bottom first: back from the newest
    manifest to the nearest one that holds this disk in full."""
    stack: list[dict] = []
    for manifest in reversed(chain):
        disk = next((d for d in manifest["disks"] if d["target"] == target), None)
        if disk is None:
            raise StorageError(f"restore point {manifest['point_id']} has no disk {target}")
        stack.append(disk)
        if disk["mode"] == "full":
            return list(reversed(stack))
    raise StorageError(f"no full image of {target} in the chain of {chain[-1]['point_id']}")


def targets_of(chain: Chain) -> list[str]:
    return [d["target"] for d in chain.manifests[-1]["disks"]]


def _check_matches_catalog(chain: list[PointView], manifests: list[dict]) -> None:
    """Each manifest names exactly the catalog's artifacts, for the catalog's disk
    targets, and every target is a disk name (targets become file names)."""
    for p, m in zip(chain, manifests, strict=True):
        for a in p.artifacts:
            check_target(a.target, p.id)
        want = {a.key: (a.target, a.sha256) for a in p.artifacts}
        try:
            have = {d["key"]: (d["target"], d["sha256"]) for d in m["disks"]}
        except (KeyError, TypeError):
            have = None
        if m["point_id"] != p.id or want != have:
            targets = sorted(repr(t) for t, _ in (have or {}).values() if t not in {a.target for a in p.artifacts})
            differ = f"; disk target {', '.join(targets)} is not the catalog's" if targets else ""
            raise ChecksumMismatch(f"restore point {p.id}: manifest {p.manifest_key} does not match the catalog "
                                   f"(its point id, artifacts, disk targets or checksums differ{differ}); "
                                   "nothing was written")


def _format2_manifest(repo2: Format2Repository, point: PointView) -> dict:
    """A format-2 point's manifest, in the shape the restore steps read: each disk one
    full layer, named by its index (key and SHA-256, as the catalog has them)."""
    ref = repo2.ref(point.domain, point.id)
    m = repo2.manifest(ref, expected_sha256=point.manifest_sha256)
    disks = [{"target": d["target"], "mode": "full", "format": "raw", "key": ref.index_key(d["target"]),
              "sha256": d["index_sha256"], "size_bytes": d.get("stored_bytes", 0),
              "virtual_size": d["virtual_size"], "source": d.get("source")} for d in m["disks"]]
    return {**m, "disks": disks}


FETCHED = "restore-fetched"  # test fault point: the artifacts are in scratch space (format 2: being served)


# --- reading and rebuilding -----------------------------------------------------------
@contextmanager
def fetched(ctx: JobContext, backend: Backend, chain: Chain, *, share: float = 0.7
            ) -> Iterator[dict[str, qemu_img.Layer]]:
    """Every layer the point's disks need, readable by ``rebuild`` and ``rebuild_new``
    while the block runs; key -> layer.

    Format 1: every artifact is copied into this job's scratch directory and verified
    while it is copied. The SHA-256 is computed over exactly the bytes written to the
    copy, and only the copy is read afterwards: an artifact changed on storage after it
    was checked can no longer reach a restored image (on a mounted filesystem the stored
    file itself could change between a check and the rebuild's read). Progress runs from
    0 to ``share``.

    Format 2: nothing is copied. Each disk is served from its chunks over NBD
    (``served_disks``) and the rebuild reads it from there in one pass; every chunk is
    authenticated as it is read (its tag binds it to its id)."""
    if chain.repo2 is None:
        yield _copy_format1(ctx, backend, chain, share)
        return
    point = chain.point
    ref = chain.repo2.ref(point.domain, point.id)
    disks = chain.manifests[-1]["disks"]
    try:
        indexes = [chain.repo2.index(ref, d["target"], d["sha256"]) for d in disks]
    except ChecksumMismatch as e:
        raise ChecksumMismatch(f"restore point {point.id}: {e}; nothing was written") from e
    try:
        with served_disks(chain.repo2.chunks, indexes, point.id, ctx.scratch) as served:
            yield {d["key"]: served[d["target"]] for d in disks}
    except UnreadableChunks as e:
        # As a verification would: the points using a chunk damaged at rest are never
        # restored or built on again, and the domain's next backup stores it again. A
        # chunk that reads intact the second time was damaged on its way: try again.
        if not take_out_of_service(ctx, chain.repo2, point.storage, e.chunks, f"restore job {ctx.job_id}"):
            raise StorageUnavailable(f"{e}; but every such chunk read intact the second time (damaged on its "
                                     f"way from the storage): trying again") from e
        raise


def _copy_format1(ctx: JobContext, backend: Backend, chain: Chain, share: float) -> dict[str, qemu_img.Layer]:
    needed = {d["key"]: d for t in targets_of(chain) for d in layers_for(chain.manifests, t)}
    owner = {d["key"]: p for p, m in zip(chain.points, chain.manifests, strict=True) for d in m["disks"]}
    total = sum(d["size_bytes"] for d in needed.values())
    _check_scratch_space(ctx, chain.point.id, total)
    done = 0
    local: dict[str, qemu_img.Layer] = {}
    for i, d in enumerate(needed.values()):
        base = done

        def moved(n: int, base: int = base) -> None:
            ctx.report(share * (base + n) / (total or 1), f"reading and verifying: {(base + n) >> 20} MiB")

        path = ctx.scratch / f"{i:04d}-{d['target']}.qcow2"
        try:
            backend.get_file(d["key"], path, expected_sha256=d["sha256"], progress=moved, durable=False)
        except (ChecksumMismatch, ObjectNotFound) as e:
            _artifact_out_of_service(ctx, backend, owner[d["key"]], d, e)
            raise
        local[d["key"]] = path
        done += d["size_bytes"]
    return local


def _artifact_out_of_service(ctx: JobContext, backend: Backend, point: PointView, disk: dict,
                             error: StorageError) -> None:
    """What verify does with an artifact it finds damaged or missing, for one a restore
    could not copy: read through again, and when it fails again its point is marked
    damaged with every point built on it, so the domain's next backup starts a new chain
    instead of building on one that cannot be restored. An artifact that reads intact the
    second time was damaged on its way: StorageUnavailable, and the job is tried again."""
    try:
        backend.verify(disk["key"], disk["sha256"])
    except (ChecksumMismatch, ObjectNotFound) as again:
        marked = points.mark_damaged(ctx.catalog, point.id, f"{disk['key']}: {again} (found by restore job "
                                     f"{ctx.job_id})")
        if marked:
            log.error("domain %s job %s: point %s damaged (%s: %s)%s", point.domain, ctx.job_id, point.id, disk["key"],
                      again, f"; with it the points built on it: {', '.join(marked[1:])}" if marked[1:] else "")
        return
    raise StorageUnavailable(f"{error}; but it read intact the second time (damaged on its way from the "
                             f"storage): trying again") from error


@contextmanager
def served_disks(chunks: ChunkStore, indexes: list[DiskIndex], point_id: str, directory: Path
                 ) -> Iterator[dict[str, qemu_img.NbdDisk]]:
    """Each disk of a format-2 point served read-only over NBD from its chunks while the
    block runs (storage_backends/format2/nbd.py), on sockets in ``directory`` (a job's
    scratch: what a killed attempt leaves there goes with it); target -> layer for
    ``qemu-img``. A chunk that fails its check fails the read, and the ``qemu-img``
    failure that follows is raised as the ChecksumMismatch naming the point, disk and
    offset."""
    with ExitStack() as stack:
        exports = [stack.enter_context(ChunkExport(chunks, index, directory)) for index in indexes]
        try:
            yield {e.index.target: qemu_img.NbdDisk(e.socket, e.fd) for e in exports}
        except ToolFailed as e:
            _raise_failed_read(exports, point_id, e)
            raise
        _raise_failed_read(exports, point_id, None)  # qemu-img cannot succeed past a failed read; never publish


class UnreadableChunks(ChecksumMismatch):
    """A restore met chunks damaged or missing: ``chunks``, their ids."""

    def __init__(self, message: str, chunks: set[str]) -> None:
        super().__init__(message)
        self.chunks = chunks


def _raise_failed_read(exports: list[ChunkExport], point_id: str, cause: Exception | None) -> None:
    """Raise what made an export's read fail (qemu-img only says "Input/output error"): a
    damaged chunk as the ChecksumMismatch naming point, disk and offset (UnreadableChunks,
    with the ids); the storage's own error as it is, so that an unreachable storage is
    retried like any other."""
    failure = next((x.failure for x in exports if x.failure is not None), None)
    if isinstance(failure, DamagedObject):
        raise UnreadableChunks(f"restore point {point_id}: {failure}; nothing was written",
                               set().union(*(x.unreadable for x in exports))) from cause
    if failure is not None:
        raise failure from cause


def _check_scratch_space(ctx: JobContext, point_id: str, need: int) -> None:
    st = os.statvfs(ctx.scratch)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NoSpace(f"scratch directory {ctx.scratch_root} has {free} bytes free; restoring point {point_id} "
                      f"copies {need} bytes of artifacts there first (nothing was changed)")


def rebuild(local: dict[str, qemu_img.Layer], layers: list[dict], out: Path, *, fmt: str = "qcow2",
            partial: Path | None = None, publish: Callable[[Path, Path], None] | None = None) -> Path:
    """Flatten ``layers`` into ``out`` (format ``fmt``): written under ``partial`` (by
    default a hidden name beside ``out``), fsynced, then published by ``publish``
    (default: renamed over ``out``). The partial file never outlives the call."""
    partial = partial or out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # qemu-img's own mode
        try:
            _write_image([local[d["key"]] for d in layers], fd, fmt, out.name, out.parent)
        finally:
            os.close(fd)
        (publish or os.replace)(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _write_image(layers: list[qemu_img.Layer], fd: int, fmt: str, name: str, where: Path | str) -> None:
    """``layers`` flattened into the empty file open as ``fd`` (past the page cache where
    its filesystem allows: ``qemu_img.direct_writes``), then fsynced. NoSpace names the
    image, the directory and the room left there."""
    try:
        qemu_img.flatten_into(layers, fd, fmt=fmt)
        os.fsync(fd)
    except NoSpace as e:
        free = os.fstatvfs(fd)
        raise NoSpace(f"restoring {name} into {where}: {e}; {free.f_bavail * free.f_frsize} bytes free "
                      f"there") from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- restore into a directory -----------------------------------------------------------
def rebuild_new(local: dict[str, qemu_img.Layer], layers: list[dict], into: NewDir, name: str, *,
                fmt: str = "qcow2") -> None:
    """Flatten ``layers`` into the new file ``name`` of ``into`` (created exclusively,
    0600, written through its descriptor, fsynced); it gets its name at ``into.publish``."""
    fd = into.create(name)
    try:
        _write_image([local[d["key"]] for d in layers], fd, fmt, name, into.path)
    finally:
        os.close(fd)


def run_restore(ctx: JobContext, req: RestoreRequest, *, dir_mode: int = PRIVATE_DIR) -> dict:
    """Restore into ``req.to_dir``, a new or empty directory: under the worker's
    restore.allowed_dirs unless the request is not confined (see tasks/confine.py).
    ``dir_mode``: of the directories it creates (a drill's must let QEMU pass)."""
    roots = ctx.restore_roots if req.confined else None
    if roots is not None:
        confine(req.to_dir, roots)  # before anything is read
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    backend = ctx.storage(point.storage)
    chain = load_chain(ctx.catalog, backend, point, ctx.repository)
    targets = targets_of(chain)
    ctx.clear_scratch()
    ctx.scratch.mkdir(parents=True)
    try:
        with NewDir(req.to_dir, job_id=ctx.job_id, roots=roots, mode=dir_mode) as out:
            with fetched(ctx, backend, chain) as local:
                faults.pause_point(FETCHED)
                for i, target in enumerate(targets):
                    ctx.report(0.7 + 0.3 * i / len(targets), f"rebuilding {target}")
                    rebuild_new(local, layers_for(chain.manifests, target), out, f"{target}.qcow2")
            out.write_text("domain.xml", chain.saved_xml)
            written = out.publish()
    finally:
        ctx.clear_scratch()
    ctx.report(1.0, "done")
    return {"point_id": point.id, "level": point.level, "chain": [p.id for p in chain.points],
            "to_dir": req.to_dir, "disks": [w for w in written if not w.endswith("/domain.xml")]}


# --- what a restore in place leaves for the next backup -------------------------------
def restored_in_place_reason(cat: Catalog, domain: str, domain_uuid: str, since: datetime) -> str | None:
    """Why the next backup must start a new chain, when ``domain`` was restored in place
    after ``since`` (the chain head's time): its disks are no longer the ones that chain
    describes. None when it was not."""
    job = jobs.last_finished(cat, kind=IN_PLACE_KIND, domain=domain, since=since)
    result = (job.result or {}) if job else {}
    if job is None or result.get("uuid") not in (None, domain_uuid):
        return None
    return (f"domain was restored in place from point {result.get('point_id')} (job {job.id}); "
            "its disks no longer continue the last chain, starting a new one")
