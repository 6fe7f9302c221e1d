"""The ``bitmap`` backup job: libvirt's backup API with checkpoints (dirty bitmaps).

One run makes one restore point of every disk of a running domain:

1. clean up what an earlier, interrupted attempt of the same job left (recovery);
2. choose full or incremental (``plan_level``, a pure function) and say why (a chain a
   verification found damaged is never continued);
3. push-mode backup of all disks, creating the new checkpoint in the same libvirt call,
   so the bitmap starts exactly at the copy (the guest's filesystems frozen through its
   agent for that call only: ``tasks.quiesce``); libvirt writes each image straight onto a
   mounted target (NFS) under a temporary name, or into this job's scratch directory
   when the target is S3;
4. store each image (publish the staged file, or upload it; sha256 computed on the
   way), then the manifest, last;
5. mark the point complete, then drop our checkpoints that no chain needs any more.

A failure at any step fails the point (never listed as usable), removes the new
checkpoint, the stored pieces and the scratch files, and leaves the previous chain
head and its checkpoint as they were, so the next run continues the chain. That clean-up
is done only by the attempt that still owns the job (catalog/fencing.py), and only for
a point it moved from writing to failed: a worker that lost the job, or that cannot
tell whether its last commit went through, touches nothing (``_undo``,
``complete_point``).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from catalog import points
from catalog.points import ArtifactView, PointView
from hypervisor import qemu_img
from hypervisor.types import NAME_PREFIX, DomainInfo
from storage_backends.repository import Repository
from tasks import quiesce, recovery
from tasks.context import JobContext
from tasks.moved import adopt_checkpoint
from virtwarden import faults, permissions
from virtwarden.errors import (
    CheckpointMissing,
    DatabaseUnavailable,
    HypervisorError,
    JobFailed,
    LeaseLost,
    NoSpace,
    ToolFailed,
    VirtwardenError,
)

log = logging.getLogger(__name__)
STRATEGY = "bitmap"
COMMIT_RECHECK_SECONDS = 120.0  # how long a lost commit answer is chased before giving up


@dataclass(frozen=True)
class BackupRequest:
    domain: str
    storage: str
    strategy: str = STRATEGY
    full_every: int = 7  # incrementals after a full before the next full
    force_full: bool = False
    policy: str | None = None
    # The policy's backup.retention (policies.model.Retention as data): applied to this
    # domain's chain group after each successful backup.
    retention: dict | None = None
    # Freeze the guest's filesystems for the copy's instant: auto | always | never
    # (tasks.quiesce).
    quiesce: str = "auto"


@dataclass(frozen=True)
class LevelPlan:
    level: str  # full | incremental
    reason: str
    parent: PointView | None = None


def plan_level(req: BackupRequest, dom: DomainInfo, head: PointView | None, checkpoints: set[str],
               restored: str | None = None, damaged: PointView | None = None) -> LevelPlan:
    """Full or incremental, and why. Pure: decided from the catalog's chain head, the
    checkpoints libvirt still has, ``restored``: why the disks were replaced by a
    restore in place since the head, if they were, and ``damaged``: a point of the
    head's chain (or after it) that a verification found damaged, if any."""
    if req.force_full:
        return LevelPlan("full", "full backup requested")
    if damaged is not None:
        return LevelPlan("full", f"restore point {damaged.id} of the last chain is damaged ({damaged.damage}); "
                                 "starting a new chain")
    if head is None:
        return LevelPlan("full", "no earlier backup of this domain on this target")
    if restored:
        return LevelPlan("full", restored)
    if head.seq >= req.full_every:
        return LevelPlan("full", f"chain reached full_every={req.full_every} incrementals")
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


def run_backup(ctx: JobContext, req: BackupRequest) -> dict:
    # A shut-off domain is copied whole whatever the strategy (see _run_bitmap).
    if req.strategy == "blockcommit" and ctx.require_hypervisor().domain(req.domain).active:
        from tasks.blockcommit import run_blockcommit_backup

        result = run_blockcommit_backup(ctx, req)
    else:
        result = _run_bitmap(ctx, req)
    if req.retention:
        result["retention"] = _apply_retention(ctx, req)
    return result


def _apply_retention(ctx: JobContext, req: BackupRequest) -> dict:
    """Prune the chain group the new point belongs to. The backup succeeded whatever
    happens here: a failed prune is reported in the result and retried next time."""
    from policies.model import Retention
    from tasks.prune import prune_domain

    try:
        done = prune_domain(ctx, req.domain, req.storage, req.strategy, Retention(**req.retention or {}))
        return {"deleted": done["deleted"], "kept": len(done["kept"])}
    except VirtwardenError as e:
        log.warning("domain %s job %s: retention after backup failed: %s", req.domain, ctx.job_id, e)
        return {"error": str(e)}


def _run_bitmap(ctx: JobContext, req: BackupRequest) -> dict:
    hv = ctx.require_hypervisor()
    recovery.recover_backup(ctx, req.domain)
    dom = hv.domain(req.domain)
    if not dom.disks:
        raise HypervisorError(f"domain {req.domain!r} has no file or block disks to back up")
    ctx.storage(req.storage).check()  # an unreachable target fails before anything changes
    if not dom.active:
        # libvirt takes checkpoints of running domains only, and dirty bitmaps cannot be
        # read without QEMU: a shut-off domain gets a full copy of its disks, made with
        # qemu-img while it holds the images' locks, so the domain cannot start meanwhile
        # (its start fails; a later run backs it up online). Starting it paused instead
        # would allow incrementals, but a paused guest someone resumes would then be
        # destroyed with our connection.
        return _make_point(ctx, req, dom, LevelPlan(
            "full", f"domain is not running ({dom.state}): disks copied whole with qemu-img "
                    "(checkpoints need a running domain)"),
            online=False)
    quiesce.check(hv, req.domain, req.quiesce, ctx.agent)  # quiesce: always without an agent changes nothing
    head = points.chain_head(ctx.catalog, dom.uuid, req.storage, req.strategy)
    ours = {c.name for c in hv.checkpoints(req.domain)}
    adopted = adopt_checkpoint(ctx, dom, head, ours)  # the domain moved here: its bitmaps came along
    if adopted and adopted.ok and head and head.checkpoint:
        ours.add(head.checkpoint)
    damaged = points.damaged_since(ctx.catalog, dom.uuid, req.storage, req.strategy, head)
    plan = plan_level(req, dom, head, ours, restored_since(ctx, dom, head), damaged)
    if adopted:
        plan = replace(plan, reason=f"{plan.reason} ({adopted.note})")
    try:
        return _make_point(ctx, req, dom, plan)
    except CheckpointMissing as e:
        if plan.level != "incremental" or plan.parent is None:
            raise
        # QEMU dropped the bitmaps (unclean stop): forget the checkpoint, start over.
        log.warning("domain %s: %s; falling back to a full backup", req.domain, e)
        _forget_checkpoint(hv, req.domain, plan.parent.checkpoint or "")
        return _make_point(ctx, req, dom, LevelPlan("full", f"checkpoint unusable: {e}"))


def restored_since(ctx: JobContext, dom: DomainInfo, head: PointView | None) -> str | None:
    """Why the chain ``head`` ends, when the domain was restored in place after it."""
    from tasks.restore import restored_in_place_reason

    return restored_in_place_reason(ctx.catalog, dom.name, dom.uuid, head.created_at) if head else None


def _forget_checkpoint(hv, domain: str, name: str) -> None:  # noqa: ANN001
    """Remove a broken checkpoint with its bitmaps if libvirt can, else its metadata only
    (the stale bitmap then stays in the image, unused, under a name we never reuse)."""
    try:
        hv.delete_checkpoint(domain, name)
    except HypervisorError:
        hv.delete_checkpoint(domain, name, metadata_only=True)


def _make_point(ctx: JobContext, req: BackupRequest, dom: DomainInfo, plan: LevelPlan, *,
                online: bool = True) -> dict:
    hv = ctx.require_hypervisor()
    repo = Repository(ctx.storage(req.storage))
    point_id = str(uuid.uuid4())
    parent = plan.parent
    chain_id = parent.chain_id if parent else str(uuid.uuid4())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    checkpoint = f"{NAME_PREFIX}{stamp}-{point_id[:8]}" if online else None
    consistency = "crash" if online else "offline"
    prefix = repo.point_prefix(dom.name, chain_id, point_id)
    point = points.begin(
        ctx.catalog, id=point_id, domain=dom.name, domain_uuid=dom.uuid, host=hv.name,
        storage=req.storage, strategy=req.strategy, chain_id=chain_id,
        parent_id=parent.id if parent else None, seq=parent.seq + 1 if parent else 0,
        level=plan.level, reason=plan.reason, checkpoint=checkpoint,
        manifest_key=repo.manifest_key(prefix), job_id=ctx.job_id)
    log.info("domain %s job %s: %s backup to %s (%s)", dom.name, ctx.job_id, plan.level,
             req.storage, plan.reason)
    started = False
    try:
        ctx.clear_scratch()
        permissions.make_dirs(ctx.scratch)
        outputs = _outputs(ctx, repo, prefix, dom, req.storage)
        # An unprivileged QEMU opens the targets libvirt creates by their path.
        permissions.let_qemu_through({o.path.parent for o in outputs.values()})
        _check_space(dom, plan, outputs)
        ctx.report(0.0, f"{plan.level} backup: copying {len(outputs)} disk(s)")
        if checkpoint:
            # Push mode copies the disks as they are when backupBegin returns: the guest
            # is frozen for that call only, and thawed while QEMU copies.
            qlog = quiesce.job_log(dom.name, ctx.job_id)
            with quiesce.quiesced(hv, dom.name, req.quiesce, ctx.agent, log=qlog) as consistency:
                hv.begin_backup(dom.name, {t: str(o.path) for t, o in outputs.items()}, checkpoint=checkpoint,
                                incremental_from=parent.checkpoint if parent else None,
                                bitmap_disks={d.target for d in dom.disks if d.has_bitmaps}, skip=set())
                started = True
            _wait(ctx, dom.name, outputs)
        else:
            _copy_offline(ctx, dom, outputs)
        artifacts = _store(ctx, repo, outputs)
        cp_xml = hv.checkpoint_xml(dom.name, checkpoint) if checkpoint else ""
        manifest = _manifest(ctx, dom, point, plan, checkpoint, artifacts, cp_xml, consistency=consistency)
        digest = repo.write_manifest(prefix, manifest)
        faults.pause_point("after-manifest")
        done = complete_point(ctx, point_id, artifacts, consistency=consistency, manifest_sha256=digest)
    except BaseException as e:
        _undo(ctx, repo, dom.name, point_id, prefix, checkpoint if started else None, e)
        raise
    finally:
        ctx.clear_scratch()
    recovery.drop_unneeded_checkpoints(ctx, dom)
    ctx.report(1.0, "done")
    return {"point_id": done.id, "level": done.level, "chain_id": done.chain_id,
            "size_bytes": done.size_bytes, "reason": plan.reason, "consistency": done.consistency,
            "disks": [a.target for a in artifacts], "checkpoint": checkpoint}


@dataclass(frozen=True)
class _Output:
    """Where libvirt writes one disk's image, and where that place is, for messages."""

    key: str
    path: Path
    staged: bool  # made in place on the target's own filesystem (NFS), not in scratch
    place: str


def _outputs(ctx: JobContext, repo: Repository, prefix: str, dom: DomainInfo, storage: str) -> dict[str, _Output]:
    """Images go straight onto a mounted target when it can take them (no second copy);
    otherwise into this job's scratch directory, to be uploaded."""
    out = {}
    for d in dom.disks:
        key = repo.artifact_key(prefix, d.target)
        staged = repo.backend.stage(key)
        if staged is not None:
            out[d.target] = _Output(key, staged, True, f"storage {storage!r} ({staged.parent})")
        else:
            out[d.target] = _Output(key, ctx.scratch / f"{d.target}.qcow2", False,
                                    f"scratch directory {ctx.scratch_root}")
    return out


def _copy_offline(ctx: JobContext, dom: DomainInfo, outputs: dict[str, _Output]) -> None:
    for i, d in enumerate(dom.disks):
        ctx.report(0.6 * i / len(dom.disks), f"copying {d.target} of shut-off {dom.name} with qemu-img")
        try:
            qemu_img.copy_locked(Path(d.path), d.format, outputs[d.target].path)
        except ToolFailed as e:
            if "lock" in str(e):
                raise HypervisorError(f"disk {d.target} of {dom.name!r} is in use (was the domain started?): "
                                      f"{e}; the next run backs it up online") from e
            raise


def _check_space(dom: DomainInfo, plan: LevelPlan, outputs: dict[str, _Output]) -> None:
    """A full copy needs room for every disk's data: refuse early rather than fill a
    filesystem halfway."""
    if plan.level != "full":
        return
    need: dict[Path, int] = {}
    for d in dom.disks:
        where = outputs[d.target].path.parent
        try:
            need[where] = need.get(where, 0) + int(qemu_img.info(Path(d.path)).get("actual-size", 0))
        except Exception:  # noqa: BLE001 - an estimate only; the copy itself will tell
            pass
    for where, size in need.items():
        free = _free(where)
        if size > free:
            place = next(o.place for o in outputs.values() if o.path.parent == where)
            raise NoSpace(f"{place} has {free} bytes free; a full backup of {dom.name!r} needs about {size}")


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


_FULL = ("No space left on device", "Disk quota exceeded")  # strerror(ENOSPC), strerror(EDQUOT)


def _wait(ctx: JobContext, domain: str, outputs: dict[str, _Output]) -> None:
    hv = ctx.require_hypervisor()
    while True:
        state = hv.backup_state(domain)
        if not state.active:
            break
        ctx.report(0.6 * state.fraction, f"copying disks: {state.processed >> 20} of {state.total >> 20} MiB")
        time.sleep(ctx.poll_seconds)
    if not state.ok:
        # libvirt deletes the target images of a failed push backup, so the space may
        # be free again by now; QEMU's error (strerror) says what happened.
        said_full = any(text in (state.error or "") for text in _FULL)
        for o in outputs.values():
            if said_full or _free(o.path.parent) < 16 << 20:
                raise NoSpace(f"backup of {domain!r} failed: {o.place} is full ({state.error}; "
                              f"{_free(o.path.parent)} bytes free now)")
        raise JobFailed(f"libvirt backup job of {domain!r} failed: {state.error}")


def _store(ctx: JobContext, repo: Repository, outputs: dict[str, _Output]) -> list[ArtifactView]:
    out = []
    total = sum(os.path.getsize(o.path) for o in outputs.values()) or 1
    sent = 0
    for target, o in outputs.items():
        qemu_img.detach_backing(o.path)  # libvirt names the live disk as backing: never keep that
        virtual = int(qemu_img.info(o.path)["virtual-size"])
        base = sent

        def moved(n: int, base: int = base, target: str = target) -> None:
            ctx.report(0.6 + 0.39 * (base + n) / total, f"storing {target}: {(base + n) >> 20} MiB")

        if o.staged:
            stored = repo.backend.publish_staged(o.key, o.path, progress=moved)
        else:
            stored = repo.backend.put_file(o.key, o.path, progress=moved)
        sent += stored.size
        out.append(ArtifactView(target, o.key, stored.size, stored.sha256, virtual))
    return out


def _manifest(ctx: JobContext, dom: DomainInfo, point: PointView, plan: LevelPlan, checkpoint: str | None,
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
        "completed_at": datetime.now(timezone.utc).isoformat(),
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


def _undo(ctx: JobContext, repo: Repository, domain: str, point_id: str, prefix: str,
          checkpoint: str | None, error: BaseException) -> None:
    """Leave nothing half-done: the point failed, its pieces and checkpoint removed, but
    only by the attempt that still owns the job, and the data only of a point this call
    moved from writing to failed (never of one the catalog lists as complete). When
    that cannot be known (lease lost, catalog unreachable) nothing is touched: the
    next attempt's recovery, or the sweep of unfinished points, does it."""
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
                 lambda: recovery.remove_point_data(repo, prefix)):
        try:
            ctx.ensure_owner(f"clean up after the failed backup of {domain}")
            step()
        except LeaseLost:
            return
        except Exception as cleanup_error:  # noqa: BLE001 - report, keep cleaning
            log.warning("domain %s job %s: cleanup after failure: %s", domain, ctx.job_id, cleanup_error)
