"""Cleaning up after an attempt that did not finish (its worker was killed or lost).

A backup attempt first undoes what earlier attempts left (``recover_backup``): the
points they left ``writing`` are failed (catalog first, so a point is unlisted before its
data goes) and their stored pieces removed; a libvirt backup job still running for a
checkpoint of ours that no complete point has (a dead attempt's copy, or one libvirt
recovered from QEMU after libvirtd restarted) is aborted and such checkpoints deleted;
earlier attempts' scratch directories are removed. It runs with the domain's lock held,
so no other job of ours is working on the domain, and every destructive step is taken
only after proving this attempt still owns the job (``JobContext.ensure_owner``).

``recover_backup_job`` is the same for a job that gives up: the reaper queues it once
more to run only this, then it is marked failed.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from virtwarden.catalog import points
from virtwarden.hypervisor.types import DomainInfo, Hypervisor
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.context import JobContext

from virtwarden.errors import DomainNotFound, HypervisorError

if TYPE_CHECKING:
    from virtwarden.tasks.backup_steps import BackupRequest

log = logging.getLogger(__name__)
ABORT_WAIT_SECONDS = 30.0  # how long an aborted libvirt backup job may take to end


def recover_backup(ctx: JobContext, domain: str) -> None:
    """Undo what earlier attempts of this job left (see module doc)."""
    hv = ctx.require_hypervisor()
    for p in points.writing_for_job(ctx.catalog, ctx.job_id):
        log.warning("domain %s job %s: cleaning up interrupted attempt (point %s)", domain, ctx.job_id, p.id)
        if points.fail(ctx.catalog, p.id, f"attempt interrupted (worker lost); retried as attempt {ctx.attempt}"):
            ctx.ensure_owner(f"remove the stored pieces of unfinished point {p.id}")
            remove_point_data(Repository(ctx.storage(p.storage)), p.manifest_key.rsplit("/", 1)[0] + "/")
    dom = hv.domain(domain)
    if dom.active:
        settle_backup_jobs(ctx, dom)
    ctx.clear_stale_scratch()


def settle_backup_jobs(ctx: JobContext, dom: DomainInfo) -> None:
    """Abort a libvirt backup job that an unfinished attempt of ours left running, and
    delete our checkpoints that no complete point has. A running backup job with no such
    checkpoint beside it is someone else's: refused with what to do."""
    hv = ctx.require_hypervisor()
    kept = points.checkpoints_of(ctx.catalog, dom.uuid, (points.COMPLETE,))
    orphans = [c.name for c in hv.checkpoints(dom.name) if c.ours and c.name not in kept]
    if hv.backup_job_running(dom.name):
        if not orphans:
            raise HypervisorError(f"domain {dom.name!r} has a running backup job that virtwarden did not start; let "
                                  f"it finish or abort it (virsh domjobabort {dom.name}), then back up again")
        log.warning("domain %s job %s: aborting the backup job an unfinished attempt left (checkpoint %s)",
                    dom.name, ctx.job_id, ", ".join(orphans))
        ctx.ensure_owner(f"abort the backup job an unfinished attempt left on {dom.name}")
        hv.abort_job(dom.name)
        _wait_ended(hv, dom.name)
    for name in orphans:
        ctx.ensure_owner(f"delete checkpoint {name} of an unfinished attempt")
        log.warning("domain %s job %s: deleting checkpoint %s (no complete point has it)", dom.name, ctx.job_id, name)
        try:
            hv.delete_checkpoint(dom.name, name)
        except HypervisorError:  # its bitmaps cannot be removed now: forget the metadata only
            hv.delete_checkpoint(dom.name, name, metadata_only=True)


def _wait_ended(hv: Hypervisor, domain: str) -> None:
    deadline = time.monotonic() + ABORT_WAIT_SECONDS
    while hv.backup_job_running(domain):
        if time.monotonic() > deadline:
            raise HypervisorError(f"domain {domain!r}: the aborted backup job did not end within "
                                  f"{ABORT_WAIT_SECONDS:.0f}s")
        time.sleep(0.2)


def recover_backup_job(ctx: JobContext, req: BackupRequest) -> None:
    """The recovery of a backup job that gives up: what a retry would undo first."""
    hv = ctx.require_hypervisor()
    try:
        dom = hv.domain(req.domain)
    except DomainNotFound:  # gone, or moved to another host: only the stored pieces
        for p in points.writing_for_job(ctx.catalog, ctx.job_id):
            if points.fail(ctx.catalog, p.id, "its job gave up"):
                ctx.ensure_owner(f"remove the stored pieces of unfinished point {p.id}")
                remove_point_data(Repository(ctx.storage(p.storage)), p.manifest_key.rsplit("/", 1)[0] + "/")
        return
    recover_backup(ctx, dom.name)
    if req.strategy == "blockcommit" and dom.active:
        from virtwarden.tasks.overlays import block_jobs, reconcile

        reconcile(ctx, block_jobs(ctx), dom.name, dom.uuid)


def remove_point_data(repo: Repository, prefix: str) -> None:
    """Unpublish (manifest first) and delete everything stored under a point."""
    repo.delete_point(prefix)
    repo.backend.cleanup_incomplete(prefix)


def drop_unneeded_checkpoints(ctx: JobContext, dom: DomainInfo) -> None:
    """Delete our checkpoints that no chain head needs; never touch foreign ones."""
    hv = ctx.require_hypervisor()
    keep = {p.checkpoint for p in points.heads(ctx.catalog, dom.uuid)}
    for cp in hv.checkpoints(dom.name):
        if cp.ours and cp.name not in keep:
            ctx.ensure_owner(f"delete checkpoint {cp.name}")
            try:
                hv.delete_checkpoint(dom.name, cp.name)
            except Exception as e:  # noqa: BLE001 - a leftover checkpoint is harmless
                log.warning("domain %s: could not delete checkpoint %s: %s", dom.name, cp.name, e)
