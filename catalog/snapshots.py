"""The snapshots virtwarden made. Rotation deletes only snapshots recorded here, and
only those of the policy that is rotating: a snapshot someone else took (by hand, by
another tool, or one merely named like ours) is never touched.

A row is written *before* libvirt takes the snapshot (``creating``), so a worker that
dies in between leaves a row that the next run of that domain settles by asking libvirt,
never an unrecorded snapshot of ours.

States::

    creating   recorded; libvirt may or may not have the snapshot yet
    present    libvirt has it
    deleted    we deleted it (retention or by request)
    missing    libvirt no longer has it and we did not delete it (someone else did, or
               the creation never happened)
"""
from __future__ import annotations

from sqlalchemy import select
from virtwarden.catalog.clock import db_now
from virtwarden.catalog.models import Snapshot, utcnow
from virtwarden.catalog.store import Catalog
from virtwarden.catalog.views import CREATING, DELETED, MISSING, PRESENT, SnapshotView


def _view(row: Snapshot) -> SnapshotView:
    return SnapshotView(row.id, row.domain, row.domain_uuid, row.host, row.name, row.policy, row.kind,
                        row.consistency, row.state, row.job_id, row.created_at, row.deleted_at)


def begin(cat: Catalog, *, domain: str, domain_uuid: str, host: str, name: str, policy: str | None,
          kind: str, job_id: str | None) -> SnapshotView:
    """Record a snapshot about to be taken."""
    with cat.session() as s:
        row = Snapshot(domain=domain, domain_uuid=domain_uuid, host=host, name=name, policy=policy, kind=kind,
                       consistency="", state=CREATING, job_id=job_id, created_at=db_now())
        s.add(row)
        s.flush()
        s.refresh(row)
        return _view(row)


def taken(cat: Catalog, snapshot_id: int, consistency: str) -> SnapshotView:
    with cat.session() as s:
        row = s.get_one(Snapshot, snapshot_id)
        row.consistency, row.state = consistency, PRESENT
        return _view(row)


def forget(cat: Catalog, snapshot_id: int) -> None:
    """Drop the row of a snapshot libvirt refused to take."""
    with cat.session() as s:
        row = s.get(Snapshot, snapshot_id)
        if row is not None:
            s.delete(row)


def deleted(cat: Catalog, snapshot_id: int, *, missing: bool = False) -> None:
    with cat.session() as s:
        row = s.get_one(Snapshot, snapshot_id)
        row.deleted_at = utcnow()
        row.state = MISSING if missing else DELETED


def live(cat: Catalog, domain_uuid: str, policy: str | None = None, *, any_policy: bool = False) -> list[SnapshotView]:
    """The domain's recorded snapshots not deleted, oldest first: those of ``policy``
    (None: taken without a policy), or of every policy."""
    with cat.session() as s:
        q = select(Snapshot).where(Snapshot.domain_uuid == domain_uuid, Snapshot.state.in_((CREATING, PRESENT)))
        if not any_policy:
            q = q.where(Snapshot.policy.is_(None) if policy is None else Snapshot.policy == policy)
        return [_view(r) for r in s.scalars(q.order_by(Snapshot.created_at, Snapshot.id))]


def for_domain(cat: Catalog, domain: str, *, include_deleted: bool = False) -> list[SnapshotView]:
    with cat.session() as s:
        q = select(Snapshot).where(Snapshot.domain == domain)
        if not include_deleted:
            q = q.where(Snapshot.state.in_((CREATING, PRESENT)))
        return [_view(r) for r in s.scalars(q.order_by(Snapshot.created_at, Snapshot.id))]
