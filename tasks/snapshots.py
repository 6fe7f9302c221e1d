"""Snapshot rotation: take a snapshot named after its policy, then delete the policy's
snapshots its retention no longer keeps.

Names are predictable: ``virtwarden-<policy>-<UTC time>`` (``virtwarden-manual-...``
for a snapshot taken without a policy), e.g. ``virtwarden-nightly-20261127T013000Z``,
so ``virsh snapshot-list`` tells at a glance which are ours and when they were taken.

What rotation may delete: only snapshots in the catalog's ``snapshots`` table, taken by
this policy, for this domain (by UUID), that libvirt still has. A snapshot somebody
took by hand, another policy's, and one merely named like ours are never touched.
Snapshots taken without a policy are never rotated.

Consistency, recorded with each snapshot:
- ``system``: an internal snapshot of a running domain holds disks and memory together;
- ``quiesced``: an external snapshot taken with the filesystems frozen by the agent
  for that instant (tasks.quiesce, as for backups: bounded, and never left frozen);
- ``crash``: an external snapshot of a running guest without a freeze;
- ``offline``: the domain was shut off.

A domain backed up with the ``blockcommit`` strategy runs on a temporary overlay that
the next backup merges away, and an internal snapshot stored in it would vanish with
it; an external one would lengthen the chain that strategy keeps short. Both are
refused for such a domain, with that reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from virtwarden.catalog import overlays, snapshots
from virtwarden.catalog.clock import database_now
from virtwarden.catalog.snapshots import SnapshotView
from virtwarden.hypervisor.types import NAME_PREFIX, DomainInfo, Hypervisor
from virtwarden.policies.model import Retention
from virtwarden.policies.retention import select_kept
from virtwarden.tasks import quiesce
from virtwarden.tasks.context import JobContext

from virtwarden.errors import HypervisorError, VirtwardenError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotRequest:
    domain: str
    policy: str | None = None
    type: str = "internal"  # internal | external
    quiesce: str = "auto"  # auto | always | never (external snapshots only)
    retention: dict | None = None


def snapshot_name(policy: str | None, at: datetime) -> str:
    return f"{NAME_PREFIX}{policy or 'manual'}-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def run_snapshot(ctx: JobContext, req: SnapshotRequest) -> dict:
    from virtwarden.hypervisor import snapshots as hv_snapshots

    hv = ctx.require_hypervisor()
    dom = hv.domain(req.domain)
    _refuse_blockcommit_domain(ctx, req)
    if req.type == "external" and dom.active:
        quiesce.check(hv, req.domain, req.quiesce, ctx.agent)  # quiesce: always without an agent takes nothing
    existing = set(hv_snapshots.names(hv, req.domain))
    _settle(ctx, dom, existing)
    earlier = [s for s in snapshots.live(ctx.catalog, dom.uuid, any_policy=True) if s.job_id == ctx.job_id]
    if earlier:  # an earlier attempt of this job took it before its worker died
        name, consistency = earlier[0].name, earlier[0].consistency
    else:
        name, consistency = _take_recorded(ctx, hv, dom, req, existing)
    ctx.report(0.6, "applying retention")
    deleted, kept = rotate(ctx, dom, req)
    ctx.report(1.0, "done")
    return {"domain": req.domain, "snapshot": name, "type": req.type, "consistency": consistency,
            "policy": req.policy, "deleted": deleted, "kept": kept}


def _take_recorded(ctx: JobContext, hv: Hypervisor, dom: DomainInfo, req: SnapshotRequest,
                   existing: set[str]) -> tuple[str, str]:
    name = _unique(snapshot_name(req.policy, datetime.now(UTC)), existing)
    ctx.report(0.1, f"taking {req.type} snapshot {name}")
    row = snapshots.begin(ctx.catalog, domain=req.domain, domain_uuid=dom.uuid, host=hv.name, name=name,
                          policy=req.policy, kind=req.type, job_id=ctx.job_id)
    description = f"taken by virtwarden job {ctx.job_id}" + (f" for policy {req.policy}" if req.policy else "")
    try:
        consistency = _take(ctx, hv, dom, req, name, description)
    except VirtwardenError:
        snapshots.forget(ctx.catalog, row.id)
        raise
    snapshots.taken(ctx.catalog, row.id, consistency)
    log.info("domain %s: snapshot %s taken (%s, %s)", req.domain, name, req.type, consistency)
    return name, consistency


def rotate(ctx: JobContext, dom: DomainInfo, req: SnapshotRequest) -> tuple[list[str], list[str]]:
    """Delete this policy's snapshots that its retention does not keep, oldest first.
    Returns (deleted names, kept names)."""
    from virtwarden.hypervisor import snapshots as hv_snapshots

    ours = snapshots.live(ctx.catalog, dom.uuid, req.policy)
    if req.policy is None or req.retention is None:
        return [], [s.name for s in ours]
    rules = Retention.model_validate(req.retention)
    kept = select_kept([_AsPoint(s) for s in ours], rules, database_now(ctx.catalog))
    hv = ctx.require_hypervisor()
    deleted = []
    for key in sorted(kept.doomed, key=lambda k: int(k)):  # oldest first
        snap = next(s for s in ours if str(s.id) == key)
        if not snap.name.startswith(NAME_PREFIX) or snap.policy != req.policy or snap.domain_uuid != dom.uuid:
            continue  # belt and braces: never delete what this policy did not take
        ctx.report(0.7, f"deleting snapshot {snap.name}")
        ctx.ensure_owner(f"delete snapshot {snap.name} of {req.domain}")
        gone = not hv_snapshots.delete(hv, req.domain, snap.name)
        snapshots.deleted(ctx.catalog, snap.id, missing=gone)
        deleted.append(snap.name)
    return deleted, [s.name for s in ours if str(s.id) in kept.kept]


@dataclass(frozen=True)
class _AsPoint:
    """A snapshot as the retention rules see a restore point: a chain of its own."""

    snap: SnapshotView

    @property
    def id(self) -> str:
        return str(self.snap.id)

    @property
    def created_at(self) -> datetime:
        return self.snap.created_at

    @property
    def chain_id(self) -> str:
        return f"snapshot-{self.snap.id}"

    @property
    def parent_id(self) -> None:
        return None

    @property
    def level(self) -> str:
        return "full"


def _take(ctx: JobContext, hv: Hypervisor, dom: DomainInfo, req: SnapshotRequest, name: str,
          description: str) -> str:
    from virtwarden.hypervisor import snapshots as hv_snapshots

    other = "external" if req.type == "internal" else "internal"
    mixed = sorted(n for n, kind in hv_snapshots.kinds(hv, req.domain).items() if kind == other)
    if mixed:  # libvirt (9.x) deletes neither kind once the other is stacked on it
        raise HypervisorError(f"domain {req.domain!r} has {other} snapshots ({', '.join(mixed)}): libvirt cannot"
                              f" delete an {req.type} snapshot taken beside them, so rotation could never remove"
                              f" it; delete those first or use type: {other}")

    if req.type == "internal":
        not_qcow2 = [d.target for d in dom.disks if d.format != "qcow2"]
        if not_qcow2:
            raise HypervisorError(f"domain {req.domain!r}: internal snapshots need qcow2 disks, and"
                                  f" {', '.join(not_qcow2)} {'is' if len(not_qcow2) == 1 else 'are'} not;"
                                  " use type: external")
        return hv_snapshots.take_internal(hv, req.domain, name, description)
    if req.type != "external":
        raise VirtwardenError(f"unknown snapshot type {req.type!r}: internal or external")
    overlay_paths = {}
    for d in dom.disks:
        if not d.path:
            raise HypervisorError(f"domain {req.domain!r}: disk {d.target} has no file to put an overlay next to")
        path = Path(d.path)
        overlay_paths[d.target] = str(path.with_name(f"{path.stem}.{name}.qcow2"))
    clash = [p for p in overlay_paths.values() if Path(p).exists()]
    if clash:
        raise HypervisorError(f"domain {req.domain!r}: {', '.join(clash)} already exist(s); nothing was changed")
    if not dom.active:
        hv_snapshots.take_external(hv, req.domain, name, description, overlay_paths)
        return "offline"
    with quiesce.quiesced(hv, req.domain, req.quiesce, ctx.agent,
                          log=quiesce.job_log(req.domain, ctx.job_id)) as consistency:
        hv_snapshots.take_external(hv, req.domain, name, description, overlay_paths)
    return consistency


def _settle(ctx: JobContext, dom: DomainInfo, present: set[str]) -> None:
    """Bring the catalog in line with libvirt: a ``creating`` row whose snapshot exists
    was taken (its worker died right after), one without it never was; a recorded
    snapshot libvirt no longer has is marked missing (someone deleted it)."""
    for snap in snapshots.live(ctx.catalog, dom.uuid, any_policy=True):
        if snap.name in present:
            if snap.state == snapshots.CREATING:  # taken; how consistent, nobody recorded
                snapshots.taken(ctx.catalog, snap.id, "unknown")
        elif snap.state == snapshots.CREATING:
            snapshots.forget(ctx.catalog, snap.id)  # libvirt never took it
        else:
            snapshots.deleted(ctx.catalog, snap.id, missing=True)


def _refuse_blockcommit_domain(ctx: JobContext, req: SnapshotRequest) -> None:
    if overlays.open_for_domain(ctx.catalog, req.domain):
        raise VirtwardenError(
            f"domain {req.domain!r} is backed up with the blockcommit strategy: it runs on a temporary"
            " overlay that the next backup merges away, so an internal snapshot would be lost with it and an"
            " external one would lengthen the chain; snapshot it from a policy without blockcommit backups,"
            " or use the bitmap strategy")


def _unique(name: str, existing: set[str]) -> str:
    candidate, n = name, 1
    while candidate in existing:
        n += 1
        candidate = f"{name}-{n}"
    return candidate
