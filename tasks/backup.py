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
tell whether its last commit went through, touches nothing (``undo_point``,
``complete_point``). Those steps, the request and ``plan_level`` are in
``tasks.backup_steps``, shared with the ``blockcommit`` strategy.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from virtwarden.catalog import points
from virtwarden.hypervisor import qemu_img
from virtwarden.hypervisor.types import NAME_PREFIX, DomainInfo, Hypervisor
from virtwarden.tasks import quiesce, recovery
from virtwarden.tasks.backup_steps import (
    BackupRequest,
    LevelPlan,
    Output,
    PointSink,
    build_manifest,
    check_space,
    complete_point,
    free_bytes,
    plan_level,
    restored_since,
    undo_point,
)
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.moved import adopt_checkpoint

from virtwarden import faults, permissions
from virtwarden.errors import (
    CheckpointMissing,
    HypervisorError,
    JobFailed,
    NoSpace,
    ToolFailed,
    VirtwardenError,
)

log = logging.getLogger(__name__)


def run_backup(ctx: JobContext, req: BackupRequest) -> dict:
    # A shut-off domain is copied whole whatever the strategy (see _run_bitmap).
    if req.strategy == "blockcommit" and ctx.require_hypervisor().domain(req.domain).active:
        from virtwarden.tasks.blockcommit import run_blockcommit_backup


        result = run_blockcommit_backup(ctx, req)
    else:
        result = _run_bitmap(ctx, req)
    if req.retention:
        result["retention"] = _apply_retention(ctx, req)
    return result


def _apply_retention(ctx: JobContext, req: BackupRequest) -> dict:
    """Prune the chain group the new point belongs to. The backup succeeded whatever
    happens here: a failed prune is reported in the result and retried next time."""
    from virtwarden.policies.model import Retention
    from virtwarden.tasks.prune import prune_domain

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


def _forget_checkpoint(hv: Hypervisor, domain: str, name: str) -> None:
    """Remove a broken checkpoint with its bitmaps if libvirt can, else its metadata only
    (the stale bitmap then stays in the image, unused, under a name we never reuse)."""
    try:
        hv.delete_checkpoint(domain, name)
    except HypervisorError:
        hv.delete_checkpoint(domain, name, metadata_only=True)


def _make_point(ctx: JobContext, req: BackupRequest, dom: DomainInfo, plan: LevelPlan, *,
                online: bool = True) -> dict:
    hv = ctx.require_hypervisor()
    point_id = str(uuid.uuid4())
    sink = PointSink(ctx, req.storage, dom, point_id, plan)
    plan = sink.plan  # format 2 reads everything when it has no previous index to build on
    parent = plan.parent
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    checkpoint = f"{NAME_PREFIX}{stamp}-{point_id[:8]}" if online else None
    consistency = "crash" if online else "offline"
    point = points.begin(
        ctx.catalog, id=point_id, domain=dom.name, domain_uuid=dom.uuid, host=hv.name,
        storage=req.storage, strategy=req.strategy, **sink.lineage, level=plan.level, reason=plan.reason,
        checkpoint=checkpoint, manifest_key=sink.manifest_key, job_id=ctx.job_id)
    log.info("domain %s job %s: %s backup to %s (%s)", dom.name, ctx.job_id, plan.level,
             req.storage, plan.reason)
    started = False
    try:
        sink.begin(f"backup of {dom.name}, job {ctx.job_id}", lambda why: ctx.report(0.0, f"waiting: {why}"))
        ctx.clear_scratch()
        permissions.make_dirs(ctx.scratch)
        outputs = sink.outputs(ctx, dom)
        qemu = hv.qemu_user(dom.name) if checkpoint else None
        # An unprivileged QEMU opens the targets libvirt creates by their path.
        permissions.let_qemu_through({o.path.parent for o in outputs.values()}, qemu[0] if qemu else None)
        changed_only = {d.target for d in dom.disks if plan.level == "incremental" and d.has_bitmaps}
        # Format 2, shut off: the disks are read where they are (a read-only export), not copied.
        in_place = None if checkpoint else sink.store_in_place(ctx, dom)
        # Format 2, running: read over NBD from a pull-mode backup, not copied (see _pull_socket).
        pull = _pull_socket(ctx, dom.name, qemu) if checkpoint and sink.repo2 is not None else None
        if in_place is None:
            # Pull mode too: a guest that rewrites its disks while they are read puts the
            # old data in scratch, and a copy-before-write that found no room would fail
            # the guest's own write.
            check_space(dom, plan, outputs)
            ctx.report(0.0, f"{plan.level} backup: {'reading' if pull else 'copying'} {len(outputs)} disk(s)")
        artifacts = in_place
        if checkpoint:
            # The disks are read (push: copied) as they are when backupBegin returns: the
            # guest is frozen for that call only, and thawed while they are read.
            qlog = quiesce.job_log(dom.name, ctx.job_id)
            with quiesce.quiesced(hv, dom.name, req.quiesce, ctx.agent, log=qlog) as consistency:
                pull = _begin(ctx, dom, outputs, checkpoint, parent.checkpoint if parent else None, pull)
                started = True
            if pull is not None:
                log.info("domain %s job %s: pull-mode backup: reading the disks over NBD, no copy", dom.name,
                         ctx.job_id)
                faults.pause_point(PULL_BEGUN)
                artifacts = sink.store_pulled(ctx, dom, pull, changed_only)
                hv.abort_job(dom.name)  # how a pull-mode backup ends; the checkpoint stays
            else:
                _wait(ctx, dom.name, outputs)
        elif in_place is None:
            _copy_offline(ctx, dom, outputs)
        if artifacts is None:
            artifacts = sink.store(ctx, dom, outputs, changed_only)
        cp_xml = hv.checkpoint_xml(dom.name, checkpoint) if checkpoint else ""
        manifest = build_manifest(ctx, dom, point, plan, checkpoint, artifacts, cp_xml, consistency=consistency)
        digest = sink.publish(manifest, artifacts)
        faults.pause_point("after-manifest")
        done = complete_point(ctx, point_id, artifacts, consistency=consistency, manifest_sha256=digest)
    except BaseException as e:
        undo_point(ctx, sink.repo, dom.name, point_id, sink.prefix, checkpoint if started else None, e,
                   remove=sink.remove)
        raise
    finally:
        ctx.clear_scratch()
        sink.close()
    recovery.drop_unneeded_checkpoints(ctx, dom)
    ctx.report(1.0, "done")
    return {"point_id": done.id, "level": done.level, "chain_id": done.chain_id,
            "size_bytes": done.size_bytes, "reason": plan.reason, "consistency": done.consistency,
            "disks": [a.target for a in artifacts], "checkpoint": checkpoint, "format": done.format}


SOCKET_MAX = 107  # bytes of a Unix socket's path (sun_path, 108 with its NUL)
PULL_BEGUN = "pull-begun"  # test fault point: a pull-mode backup runs, nothing read yet
PULL_SOCKET_MADE = "pull-socket-made"  # test fault point: an unprivileged QEMU's socket directory is made


def _pull_socket(ctx: JobContext, domain: str, qemu: tuple[int, int] | None) -> str | None:
    """Where QEMU serves a pull-mode backup over NBD, or None for push mode. QEMU binds
    that socket itself, so it must be a path (not a descriptor), short enough for a
    socket address, in a directory QEMU may write: the job's scratch when QEMU runs as
    root; for an unprivileged QEMU (``qemu``: its uid and gid, for this domain) a
    directory in it that is QEMU's own (0700: the worker, root, connects all the same).
    Push mode when QEMU's user is not known."""
    if qemu is None:
        log.info("domain %s job %s: push-mode backup: libvirt does not say which user QEMU runs as", domain,
                 ctx.job_id)
        return None
    place = ctx.scratch
    if qemu[0] != 0:
        place = ctx.scratch / "nbd"
        place.mkdir(mode=0o700)
        os.chown(place, *qemu)
        faults.pause_point(PULL_SOCKET_MADE)
    path = str(place / "nbd.sock")
    if len(path.encode()) > SOCKET_MAX:
        log.info("domain %s job %s: push-mode backup: the scratch path is too long for a socket (%s)", domain,
                 ctx.job_id, path)
        return None
    return path


def _begin(ctx: JobContext, dom: DomainInfo, outputs: dict[str, Output], checkpoint: str, since: str | None,
           pull: str | None) -> str | None:
    """Start libvirt's backup job (pull mode on ``pull``, else push) with its checkpoint;
    the socket of the pull-mode backup it started, None for push. When QEMU could not
    serve on the socket (a MAC policy such as AppArmor's keeps it from binding one
    there), libvirt has created nothing (the NBD server starts before the checkpoint
    and the block jobs): the same backup runs in push mode instead, saying why."""
    hv = ctx.require_hypervisor()
    targets = {t: str(o.path) for t, o in outputs.items()}
    bitmaps = {d.target for d in dom.disks if d.has_bitmaps}
    try:
        hv.begin_backup(dom.name, targets, checkpoint=checkpoint, incremental_from=since, bitmap_disks=bitmaps,
                        skip=set(), pull_socket=pull)
        return pull
    except HypervisorError as e:
        if pull is None or "nbd-server-start" not in str(e):
            raise
        log.warning("domain %s job %s: QEMU could not serve the pull-mode backup on %s (%s); backing up in push "
                    "mode (a copy into scratch). Under AppArmor, let QEMU write sockets in the scratch directory "
                    "(/etc/apparmor.d/local/abstractions/libvirt-qemu)", dom.name, ctx.job_id, pull, e)
    hv.begin_backup(dom.name, targets, checkpoint=checkpoint, incremental_from=since, bitmap_disks=bitmaps,
                    skip=set(), pull_socket=None)
    return None


def _copy_offline(ctx: JobContext, dom: DomainInfo, outputs: dict[str, Output]) -> None:
    for i, d in enumerate(dom.disks):
        ctx.report(0.6 * i / len(dom.disks), f"copying {d.target} of shut-off {dom.name} with qemu-img")
        try:
            qemu_img.copy_locked(Path(d.path), d.format, outputs[d.target].path)
        except ToolFailed as e:
            if "lock" in str(e):
                raise HypervisorError(f"disk {d.target} of {dom.name!r} is in use (was the domain started?): "
                                      f"{e}; the next run backs it up online") from e
            raise


_FULL = ("No space left on device", "Disk quota exceeded")  # strerror(ENOSPC), strerror(EDQUOT)


def _wait(ctx: JobContext, domain: str, outputs: dict[str, Output]) -> None:
    hv = ctx.require_hypervisor()
    while True:
        state = hv.backup_state(domain)
        if not state.active:
            break
        ctx.report(0.6 * state.fraction, f"copying disks: {state.processed >> 20} of {state.total >> 20} MiB")
        time.sleep(ctx.poll_seconds)
    if not state.ok:
        # QEMU's error (strerror) says what happened; the partly written targets are
        # still in scratch (we created them), so a full disk is still full here.
        said_full = any(text in (state.error or "") for text in _FULL)
        for o in outputs.values():
            if said_full or free_bytes(o.path.parent) < 16 << 20:
                raise NoSpace(f"backup of {domain!r} failed: {o.place} is full ({state.error}; "
                              f"{free_bytes(o.path.parent)} bytes free now)")
        raise JobFailed(f"libvirt backup job of {domain!r} failed: {state.error}")
