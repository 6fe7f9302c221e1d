"""Verify the repository: re-read stored restore points and check them against the
checksums the catalog recorded; take what is damaged out of service.

For the complete points in scope (one domain or all, one storage target or all):

1. every point's manifest is read and checked: its SHA-256 against the catalog's record
   (points made before manifests were checksummed have none: they are compared with
   the catalog only, and the report says how many), its artifacts against the catalog's;
2. the artifacts of a sample of the points are read through and their SHA-256 checked
   (``choose_sample``: ``sample_percent`` of the artifacts, rounded up to whole points,
   those never verified first, then the least recently verified; 100 reads them all);
3. a point whose manifest or data is missing or does not match is marked ``damaged``
   with what was found, together with every point built on it (``points.mark_damaged``):
   never restored, never built on; the next backup of the domain starts a new chain and
   says why. Points read through intact get ``verified_at``.

Something found fails the job (``VerificationFailed``, with the whole report as the
job's result), so a scheduled or runbook-started verification pages someone. An
unreachable storage is transient (the job is tried again) and marks nothing.
"""
from __future__ import annotations

import functools
import logging
import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from virtwarden.catalog import points, repositories
from virtwarden.catalog.points import PointView
from virtwarden.storage_backends.format2.objects import DamagedObject
from virtwarden.storage_backends.format2.repository import Format2Repository
from virtwarden.storage_backends.format2.store import bounded
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.context import JobContext

from virtwarden.errors import (
    ChecksumMismatch,
    ObjectNotFound,
    RestorePointNotFound,
    StorageError,
    Transient,
    VerificationFailed,
)

log = logging.getLogger(__name__)
SHOWN = 10  # problems named in the error line; the log and the result have all of them
_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class VerifyRequest:
    domain: str | None = None  # None: every domain with points
    storage: str | None = None  # None: every storage target
    sample_percent: int = 100
    policy: str | None = None  # the policy whose schedule started it, for the record


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a point: ``damage`` (its data is missing or changed; the
    point is taken out of service) or not (it could not be read for another reason)."""

    point: str
    domain: str
    key: str
    problem: str
    damage: bool
    with_it: tuple[str, ...] = ()  # the points built on it, damaged with it

    def to_json(self) -> dict:
        return {"point": self.point, "domain": self.domain, "key": self.key, "problem": self.problem,
                "damaged": self.damage, "damaged_with_it": list(self.with_it)}


@dataclass
class _Run:
    """What one verification did and found, as it goes."""

    scope: list[PointView]
    sample: tuple[PointView, ...]
    findings: list[Finding] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    unlisted: set[str] = field(default_factory=set)  # marked damaged (or gone) during this run
    lost_chunks: dict[str, set[str]] = field(default_factory=dict)  # format 2: storage -> chunks damaged or missing
    intact_chunks: dict[str, set[bytes]] = field(default_factory=dict)  # format 2: storage -> chunks read intact
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    artifacts: int = 0
    bytes_read: int = 0


def choose_sample(candidates: Sequence[PointView], percent: int, rng: random.Random) -> tuple[PointView, ...]:
    """The points whose artifacts are re-read: at least ``percent`` % of all the
    candidates' artifacts, rounded up to whole points (a point is verified whole or not
    at all), never-verified points first, then the least recently verified, in random
    order among equals. Returned oldest first (parents before their incrementals)."""
    if percent >= 100:
        return tuple(candidates)
    want = math.ceil(sum(len(p.artifacts) for p in candidates) * max(percent, 0) / 100)
    keyed = [(p.verified_at or _NEVER, rng.random(), i) for i, p in enumerate(candidates)]
    chosen: list[int] = []
    count = 0
    for _, _, i in sorted(keyed):
        if count >= want:
            break
        chosen.append(i)
        count += len(candidates[i].artifacts)
    return tuple(candidates[i] for i in sorted(chosen))


def run_verify(ctx: JobContext, req: VerifyRequest) -> dict:
    scope = _scope(ctx, req)
    run = _Run(scope, choose_sample(scope, req.sample_percent, random.Random()))
    log.info("domain %s job %s: verifying %d point(s), re-reading %d of them (sample %d%%)", req.domain or "*",
             ctx.job_id, len(scope), len(run.sample), req.sample_percent)
    repos: dict[str, Repository] = {}
    sampled = {p.id for p in run.sample}
    total = sum(a.size_bytes for p in run.sample for a in p.artifacts) or 1
    for p in scope:
        if p.id in run.unlisted:
            continue
        if p.format == 2:
            repo2 = ctx.repository(p.storage)
            if repo2 is None:
                _found(ctx, run, p, p.manifest_key, f"a format-2 point, and storage {p.storage} is not configured "
                       "for format 2", damage=False)
                continue
            if _check_format2(ctx, run, repo2, p, reread=p.id in sampled):
                points.record_verified(ctx.catalog, [p.id])
                run.verified.append(p.id)
            continue
        repo = repos.get(p.storage) or repos.setdefault(p.storage, Repository(ctx.storage(p.storage)))
        intact = _check_manifest(ctx, run, repo, p)
        if intact and p.id in sampled and _check_artifacts(ctx, run, repo, p, total):
            points.record_verified(ctx.catalog, [p.id])
            run.verified.append(p.id)
    for storage, lost in run.lost_chunks.items():
        repo2 = ctx.repository(storage)
        if repo2 is not None:
            _mark_sharing(ctx, run, repo2, storage, lost)
    result = _report(req, run)
    if run.findings:
        raise VerificationFailed(_failure_text(run), result)
    ctx.report(1.0, "done")
    return result


def _scope(ctx: JobContext, req: VerifyRequest) -> list[PointView]:
    domains = [req.domain] if req.domain else points.domains_with_points(ctx.catalog, (points.COMPLETE,))
    return [p for d in domains
            for p in points.for_domain(ctx.catalog, d, storage=req.storage, statuses=(points.COMPLETE,))]


T = TypeVar("T")


def _twice(read: Callable[[], T]) -> T:
    """``read()``, and when what it read fails its check (ChecksumMismatch), once more:
    damage in storage shows twice, a transfer damaged on its way (an S3 endpoint that
    sends no checksum the client checks) once. Only the second read's verdict counts."""
    try:
        return read()
    except ChecksumMismatch as e:
        log.warning("verify: %s; reading it again", e)
        return read()


def _check_manifest(ctx: JobContext, run: _Run, repo: Repository, p: PointView) -> bool:
    try:
        manifest = _twice(lambda: repo.read_manifest(p.manifest_key, expected_sha256=p.manifest_sha256))
        want = {a.key: a.sha256 for a in p.artifacts}
        disks = manifest.get("disks")
        have = {d.get("key"): d.get("sha256") for d in disks if isinstance(d, dict)} if isinstance(disks, list) else {}
        if manifest.get("point_id") != p.id or want != have:
            raise ChecksumMismatch(f"manifest {p.manifest_key} does not match the catalog (its point id, "
                                   "artifacts or their checksums differ)")
    except Transient:
        raise
    except StorageError as e:  # missing, changed, unreadable: the point cannot be restored
        _found(ctx, run, p, p.manifest_key, str(e), damage=True)
        return False
    return True


def _check_format2(ctx: JobContext, run: _Run, repo2: Format2Repository, p: PointView, *, reread: bool) -> bool:
    """A format-2 point: its manifest (the catalog's SHA-256) and indexes (the manifest's)
    always; when ``reread``, every chunk it uses, each authenticated and its id checked.
    A damaged chunk is deleted: the next backup that produces its data stores it again,
    which repairs every point that names it. A chunk damaged or missing is remembered
    in ``run.lost_chunks`` (``_mark_sharing``). Chunks are read the storage target's
    ``chunk_concurrency`` at a time, and a chunk read intact earlier in the run (points share most of theirs) is
    not read again."""
    ref = repo2.ref(p.domain, p.id)
    key = p.manifest_key
    try:
        manifest = _twice(lambda: repo2.manifest(ref, expected_sha256=p.manifest_sha256))
        indexes = _twice(lambda: repo2.indexes(ref, manifest))
        want = {a.key: a.sha256 for a in p.artifacts}
        if manifest.get("point_id") != p.id or want != {ref.index_key(d["target"]): d["index_sha256"]
                                                        for d in manifest["disks"]}:
            raise ChecksumMismatch(f"manifest {key} does not match the catalog (its point id, disks or their "
                                   "index checksums differ)")
        if not reread:
            return True
        intact = run.intact_chunks.setdefault(p.storage, set())
        for index in indexes:
            todo = [cid for cid in sorted(index.referenced()) if bytes.fromhex(cid) not in intact]
            bounded(lambda cid: _reread_chunk(ctx, run, repo2, p.storage, cid), todo, repo2.chunks.workers)
            ctx.report(0.99, f"verified {p.domain} {index.target}")
    except _ChunkFailed as e:
        _found(ctx, run, p, e.key, str(e.error), damage=isinstance(e.error, (ChecksumMismatch, ObjectNotFound)))
        return False
    except Transient:
        raise
    except (ChecksumMismatch, ObjectNotFound) as e:
        _found(ctx, run, p, key, str(e), damage=True)
        return False
    except StorageError as e:
        _found(ctx, run, p, key, str(e), damage=False)
        return False
    return True


class _ChunkFailed(Exception):
    """A chunk that did not read intact: its key and what its read raised."""

    def __init__(self, key: str, error: StorageError) -> None:
        super().__init__(str(error))
        self.key, self.error = key, error


def _reread_chunk(ctx: JobContext, run: _Run, repo2: Format2Repository, storage: str, cid: str) -> None:
    """Read one chunk and check it (its tag, and its id computed again); a damaged one is
    deleted, a damaged or missing one remembered in ``run.lost_chunks``; _ChunkFailed
    for any that is not intact (a storage that is unreachable: as it is, transient)."""
    key = repo2.chunks.key(cid)
    try:
        data = _twice(lambda: repo2.chunks.get(cid))
    except Transient:
        raise
    except DamagedObject as e:
        delete_damaged(ctx, repo2, storage, cid, f"verify job {ctx.job_id}")
        with run.lock:
            run.lost_chunks.setdefault(storage, set()).add(cid)
        raise _ChunkFailed(key, e) from e
    except ObjectNotFound as e:
        with run.lock:
            run.lost_chunks.setdefault(storage, set()).add(cid)
        raise _ChunkFailed(key, e) from e
    except StorageError as e:  # e.g. permission denied: reported, not proof of damage
        raise _ChunkFailed(key, e) from e
    with run.lock:
        run.bytes_read += len(data)
        run.artifacts += 1
        run.intact_chunks[storage].add(bytes.fromhex(cid))


def _mark_sharing(ctx: JobContext, run: _Run, repo2: Format2Repository, storage: str, lost: set[str]) -> None:
    """Every complete point of the repository whose index names a chunk found damaged or
    missing is damaged too, whatever its domain and whether this verification's scope
    or sample held it: chunks are shared between points, disks and domains. Otherwise
    the next incremental backup of its domain would take the chunk's id from it without
    reading the data, and publish a point that cannot be restored. A damaged point is
    never built on: its domain's next backup reads everything and stores the chunk
    again, which repairs every point that names it."""
    for p, hit in _complete_naming(ctx, repo2, storage, lost):
        if p.id not in run.unlisted:
            _found(ctx, run, p, repo2.chunks.key(hit), f"uses chunk {hit}, found damaged or missing by this "
                   "verification", damage=True)


def _complete_naming(ctx: JobContext, repo2: Format2Repository, storage: str,
                     lost: set[str]) -> Iterator[tuple[PointView, str]]:
    """The complete points of ``storage`` in the catalog whose indexes name a chunk of
    ``lost`` (points that cannot be read are left to their own verification)."""
    for ref, hit in repo2.points_naming(lost):
        try:
            p = points.get(ctx.catalog, ref.point_id)
        except RestorePointNotFound:
            continue  # in storage, not in the catalog (being published, or pruned meanwhile)
        if p.status == points.COMPLETE and p.storage == storage:
            yield p, hit


def delete_damaged(ctx: JobContext, repo2: Format2Repository, storage: str, cid: str, by: str) -> None:
    """Delete a chunk found damaged in storage: unreadable anyway, and the next backup
    that produces its data stores it again, which repairs every point naming it. When
    this job may not delete (credentials that only read, say), storage goes on saying the
    chunk is there, so the catalog remembers it (catalog.repositories): the next backup
    that produces its data stores it again over the damaged one."""
    key = repo2.chunks.key(cid)
    try:
        repo2.backend.delete(key)
    except StorageError as e:
        log.warning("job %s: could not delete the damaged chunk %s (%s): the next backup that produces its data "
                    "stores it again over it", ctx.job_id, key, e)
        repositories.note_damaged_chunks(ctx.catalog, storage, {cid}, by)


def take_out_of_service(ctx: JobContext, repo2: Format2Repository, storage: str, suspects: set[str],
                        by: str) -> set[str]:
    """What verify does with chunks it finds damaged or missing, for chunks another job
    (a restore, a backup: ``by``) could not read: each is read again, and one that reads
    intact was damaged on its way, not in storage (nothing is marked for it). One still
    damaged is deleted (``delete_damaged``: the next backup of its data stores it again);
    then every complete point naming a chunk read damaged or missing twice is marked
    damaged, as ``_mark_sharing`` does. The chunks found damaged or missing the second
    time."""
    lost: set[str] = set()
    for cid in sorted(suspects):
        key = repo2.chunks.key(cid)
        try:
            repo2.chunks.get(cid)
        except DamagedObject:
            lost.add(cid)
            delete_damaged(ctx, repo2, storage, cid, by)
        except ObjectNotFound:
            lost.add(cid)
        else:
            log.warning("job %s: %s read intact the second time: it was damaged on its way, not in storage",
                        ctx.job_id, key)
    for p, hit in _complete_naming(ctx, repo2, storage, lost):
        problem = f"{repo2.chunks.key(hit)}: uses chunk {hit}, found damaged or missing by {by}"
        if points.mark_damaged(ctx.catalog, p.id, problem):
            log.error("domain %s job %s: point %s damaged (%s)", p.domain, ctx.job_id, p.id, problem)
    return lost


def _check_artifacts(ctx: JobContext, run: _Run, repo: Repository, p: PointView, total: int) -> bool:
    for a in p.artifacts:
        base = run.bytes_read

        def moved(n: int, base: int = base, target: str = a.target) -> None:
            ctx.report(min(0.99, (base + n) / total), f"verifying {p.domain} {target}: {(base + n) >> 20} MiB")

        try:
            _twice(functools.partial(repo.backend.verify, a.key, a.sha256, progress=moved))
        except Transient:
            raise
        except (ChecksumMismatch, ObjectNotFound) as e:
            _found(ctx, run, p, a.key, str(e), damage=True)
            return False
        except StorageError as e:  # e.g. permission denied: not proof of damage, still a failure
            _found(ctx, run, p, a.key, str(e), damage=False)
            return False
        finally:
            run.bytes_read = base + a.size_bytes
            run.artifacts += 1
    return True


def _found(ctx: JobContext, run: _Run, p: PointView, key: str, problem: str, *, damage: bool) -> None:
    """Record a finding; a damaged point is taken out of service with its descendants.
    A point no longer complete (a prune took it while it was read) is not a finding."""
    run.unlisted.add(p.id)
    if not damage:
        run.findings.append(Finding(p.id, p.domain, key, problem, False))
        log.error("domain %s job %s: verify: point %s %s: %s", p.domain, ctx.job_id, p.id, key, problem)
        return
    marked = points.mark_damaged(ctx.catalog, p.id, f"{key}: {problem}")
    if not marked:
        now = points.get(ctx.catalog, p.id)
        if now.status != points.DAMAGED:
            log.info("domain %s job %s: verify: point %s is %s now; not a finding", p.domain, ctx.job_id, p.id,
                     now.status)
            return
    run.unlisted.update(marked)
    run.findings.append(Finding(p.id, p.domain, key, problem, True, tuple(marked[1:])))
    log.error("domain %s job %s: verify: point %s damaged (%s: %s)%s", p.domain, ctx.job_id, p.id, key, problem,
              f"; with it the points built on it: {', '.join(marked[1:])}" if marked[1:] else "")


def _report(req: VerifyRequest, run: _Run) -> dict:
    legacy = [p.id for p in run.scope if not p.manifest_sha256]
    damaged = [f for f in run.findings if f.damage]
    text = (f"{len(run.scope)} point(s), {len(run.sample)} re-read ({req.sample_percent}% sample), "
            f"{run.artifacts} artifact(s), {run.bytes_read} bytes: "
            + (f"{len(run.findings)} problem(s), {sum(1 + len(f.with_it) for f in damaged)} point(s) marked damaged"
               if run.findings else "all intact"))
    if legacy:
        text += (f"; {len(legacy)} point(s) made before manifests were checksummed: their manifests were "
                 "compared with the catalog only")
    return {"points": len(run.scope), "sample_percent": req.sample_percent, "reread": len(run.sample),
            "artifacts": run.artifacts, "bytes_read": run.bytes_read, "verified": run.verified,
            "manifests_without_checksum": legacy, "problems": [f.to_json() for f in run.findings],
            "damaged": sorted({i for f in damaged for i in (f.point, *f.with_it)}), "summary": text}


def _failure_text(run: _Run) -> str:
    shown = "; ".join(_describe(f) for f in run.findings[:SHOWN])
    more = f" (and {len(run.findings) - SHOWN} more)" if len(run.findings) > SHOWN else ""
    return f"repository verification found {len(run.findings)} problem(s) in {len(run.scope)} point(s): {shown}{more}"


def _describe(f: Finding) -> str:
    text = f"point {f.point} {f.key}: {f.problem}"
    if f.damage:
        text += f" (damaged, with {len(f.with_it)} point(s) built on it)" if f.with_it else " (damaged)"
    return text
