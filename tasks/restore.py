"""Restore a point into a directory: one flat image per disk, named after its target.

The chain (the full and every incremental up to the point) is read from the catalog and
checked against the manifests in storage; every artifact's SHA-256 is verified (read
in place on a mounted filesystem, or while it downloads into scratch space from S3),
and nothing is written to the destination until all of them are. ``qemu-img convert``
then reads each disk's layers as one chain (described on its command line, so stored
files are never modified) and writes one standalone image, which appears under its
final name only when complete.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from catalog import points
from catalog.points import PointView
from catalog.store import Catalog
from hypervisor import qemu_img
from storage_backends.repository import Repository
from tasks.context import JobContext
from virtwarden.errors import ChecksumMismatch, RestorePointNotFound, StorageError, VirtwardenError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    domain: str
    point: str  # a point id, or "latest"
    to_dir: str
    storage: str | None = None  # with "latest": only points on this target
    overwrite: bool = False


def resolve_point(cat: Catalog, domain: str, point: str, storage: str | None = None) -> PointView:
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


def run_restore(ctx: JobContext, req: RestoreRequest) -> dict:
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    chain = points.chain_to(ctx.catalog, point.id)
    repo = Repository(ctx.storage(point.storage))
    manifests = [repo.read_manifest(p.manifest_key) for p in chain]
    _check_matches_catalog(chain, manifests)
    dest = Path(req.to_dir)
    targets = [d["target"] for d in manifests[-1]["disks"]]
    _prepare_dest(dest, targets, req.overwrite)
    ctx.clear_scratch()
    ctx.scratch.mkdir(parents=True)
    try:
        local = _fetch(ctx, repo, manifests)
        written = []
        for i, target in enumerate(targets):
            ctx.report(0.7 + 0.3 * i / len(targets), f"rebuilding {target}")
            written.append(_rebuild(local, layers_for(manifests, target), dest / f"{target}.qcow2"))
        (dest / "domain.xml").write_text(manifests[-1]["domain"]["xml"])
    finally:
        ctx.clear_scratch()
    ctx.report(1.0, "done")
    return {"point_id": point.id, "level": point.level, "chain": [p.id for p in chain],
            "to_dir": str(dest), "disks": [str(w) for w in written]}


def _check_matches_catalog(chain: list[PointView], manifests: list[dict]) -> None:
    for p, m in zip(chain, manifests):
        want = {a.key: a.sha256 for a in p.artifacts}
        have = {d["key"]: d["sha256"] for d in m["disks"]}
        if m["point_id"] != p.id or want != have:
            raise ChecksumMismatch(f"manifest of restore point {p.id} does not match the catalog")


def _prepare_dest(dest: Path, targets: list[str], overwrite: bool) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VirtwardenError(f"cannot create restore directory {dest}: {e.strerror}") from e
    clash = [t for t in targets if (dest / f"{t}.qcow2").exists()]
    if clash and not overwrite:
        raise VirtwardenError(f"{dest} already holds {', '.join(t + '.qcow2' for t in clash)}; "
                              "choose an empty directory (nothing was changed)")


def _fetch(ctx: JobContext, repo: Repository, manifests: list[dict]) -> dict[str, Path]:
    """Every artifact of the chain as a local file, verified; key -> path. A backend on
    a mounted filesystem is read in place (checked by reading it through once); others
    are downloaded into scratch, checked while they stream."""
    disks = [d for m in manifests for d in m["disks"]]
    total = sum(d["size_bytes"] for d in disks) or 1
    done = 0
    local = {}
    for i, d in enumerate(disks):
        base = done

        def moved(n: int, base: int = base) -> None:
            ctx.report(0.7 * (base + n) / total, f"reading and verifying: {(base + n) >> 20} MiB")

        in_place = repo.backend.local_path(d["key"])
        if in_place is not None:
            repo.backend.verify(d["key"], d["sha256"], progress=moved)
            local[d["key"]] = in_place
        else:
            path = ctx.scratch / f"{i:04d}-{d['target']}.qcow2"
            repo.backend.get_file(d["key"], path, expected_sha256=d["sha256"], progress=moved)
            local[d["key"]] = path
        done += d["size_bytes"]
    return local


def _rebuild(local: dict[str, Path], layers: list[dict], out: Path) -> Path:
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        qemu_img.flatten([local[d["key"]] for d in layers], partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
