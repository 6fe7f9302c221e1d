"""Cleaning up after an attempt that did not finish (its worker was killed or lost).

A job that is started again first undoes what its earlier attempts left: a libvirt
backup job still running for a checkpoint of ours, that checkpoint, stored pieces of a
point that was never published, and the job's scratch directory. The point of the dead
attempt is marked failed, so it is never listed as usable.
"""
from __future__ import annotations

import logging

from catalog import points
from hypervisor.types import DomainInfo
from storage_backends.repository import Repository
from tasks.context import JobContext

log = logging.getLogger(__name__)


def recover_backup(ctx: JobContext, domain: str) -> None:
    hv = ctx.require_hypervisor()
    stale = points.writing_for_job(ctx.catalog, ctx.job_id)
    if stale:
        present = {c.name for c in hv.checkpoints(domain)}
        for p in stale:
            log.warning("domain %s job %s: cleaning up interrupted attempt (point %s)", domain, ctx.job_id, p.id)
            if p.checkpoint in present:
                # The checkpoint is created by the same call that starts the copy: an
                # active backup job next to it is the one our dead attempt started.
                if hv.has_active_job(domain):
                    hv.abort_job(domain)
                hv.delete_checkpoint(domain, p.checkpoint)
            prefix = p.manifest_key.rsplit("/", 1)[0] + "/"
            remove_point_data(Repository(ctx.storage(p.storage)), prefix)
            points.fail(ctx.catalog, p.id, f"attempt interrupted (worker lost); retried as attempt {ctx.attempt}")
    ctx.clear_scratch()


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
            try:
                hv.delete_checkpoint(dom.name, cp.name)
            except Exception as e:  # noqa: BLE001 - a leftover checkpoint is harmless
                log.warning("domain %s: could not delete checkpoint %s: %s", dom.name, cp.name, e)
