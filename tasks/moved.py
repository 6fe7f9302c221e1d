"""Continuing a backup chain whose checkpoint metadata libvirt lost.

libvirt keeps checkpoint metadata per host and never migrates it, while the dirty
bitmaps live inside the qcow2 images and travel with them (QEMU stores them when the
source lets go of the disks and loads them on the destination). So after a move the
chain head's checkpoint is missing from the new host's libvirt, but its bitmap is
there and has tracked every write since the last backup. The same holds on the
original host after a move away and back that virtwarden did not make (a `virsh
migrate`, another tool's evacuation): the metadata is gone there too.

``adopt_checkpoint`` redefines that checkpoint from the XML the last point's manifest
keeps, with REDEFINE_VALIDATE: libvirt accepts it only if the bitmap is present and
consistent in every disk, which is exactly when an incremental can follow. The
``<parent>`` element is dropped: it names a checkpoint that housekeeping deleted long
ago. If libvirt refuses, the backup becomes a full and says why, and the bitmap (if it
is there but unusable) is removed with its redefined checkpoint, so images never keep
stale bitmaps of ours that QEMU would go on updating at every guest write. A
checkpoint deleted on purpose with its bitmap (`virsh checkpoint-delete`) fails the
validation and the chain starts again, as before.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from virtwarden.catalog import moves
from virtwarden.catalog.points import PointView
from virtwarden.hypervisor.types import NAME_PREFIX, DomainInfo
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.restore import point_manifest

from virtwarden.errors import VirtwardenError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adoption:
    ok: bool
    note: str  # for the point's reason


def adopt_checkpoint(ctx: JobContext, dom: DomainInfo, head: PointView | None, present: set[str]) -> Adoption | None:
    """Redefine the chain head's checkpoint on this host after a move; None when there
    is nothing to do (no chain, checkpoint present, or the domain did not move)."""
    hv = ctx.require_hypervisor()
    if head is None or not head.checkpoint or head.checkpoint in present or not head.checkpoint.startswith(NAME_PREFIX):
        return None
    moved_from = head.host if head.host != hv.name else None
    if moved_from:
        where = f"the domain moved from host {moved_from} to {hv.name}"
    elif moves.moved_since(ctx.catalog, dom.uuid, head.created_at):
        where = f"the domain was migrated (it runs on {hv.name})"
    else:
        where = f"libvirt on {hv.name} lost the checkpoint's metadata (a move away and back, or a redefinition)"
    try:
        manifest = point_manifest(head, ctx.storage(head.storage), ctx.repository)
        saved = manifest.get("checkpoint") or {}
        if saved.get("name") != head.checkpoint or not saved.get("xml"):
            return Adoption(False, f"{where}; the last point's manifest holds no XML for checkpoint"
                                   f" {head.checkpoint} to redefine it")
        xml = without_parent(saved["xml"])
        ctx.ensure_owner(f"redefine checkpoint {head.checkpoint} of {dom.name}")
        hv.redefine_checkpoint(dom.name, xml)
    except VirtwardenError as e:
        log.warning("domain %s job %s: checkpoint %s not redefined: %s", dom.name, ctx.job_id, head.checkpoint, e)
        if "xml" in locals():
            _remove_stale_bitmap(ctx, dom, head.checkpoint, xml)
        return Adoption(False, f"{where}; redefining checkpoint {head.checkpoint} there failed: {e}")
    log.info("domain %s job %s: checkpoint %s redefined on %s (%s)", dom.name, ctx.job_id, head.checkpoint,
             hv.name, where)
    return Adoption(True, f"checkpoint {head.checkpoint} redefined on {hv.name}: {where}")


def _remove_stale_bitmap(ctx: JobContext, dom: DomainInfo, name: str, xml: str) -> None:
    """A checkpoint libvirt would not validate may still have its bitmap in the images:
    redefine it without validation and delete it, bitmaps included (the metadata only
    when libvirt cannot remove them)."""
    hv = ctx.require_hypervisor()
    try:
        ctx.ensure_owner(f"remove the stale bitmap {name} of {dom.name}")
        hv.redefine_checkpoint(dom.name, xml, validate=False)
    except VirtwardenError as e:
        log.info("domain %s job %s: no stale bitmap %s to remove: %s", dom.name, ctx.job_id, name, e)
        return
    try:
        hv.delete_checkpoint(dom.name, name)
        log.info("domain %s job %s: removed the stale bitmap %s", dom.name, ctx.job_id, name)
    except VirtwardenError:
        hv.delete_checkpoint(dom.name, name, metadata_only=True)


def without_parent(xml: str) -> str:
    """The checkpoint XML without its top-level ``<parent>`` (the ``<domain>`` inside
    it has no such element)."""
    return re.sub(r"<parent>\s*<name>[^<]*</name>\s*</parent>\s*", "", xml, count=1)
