"""Rows that only grow, deleted once they are old enough: the audit log, hypervisor
events, Alertmanager alerts, the API's idempotency keys, and the history of jobs,
schedule slots, restore points, drills, snapshots and blockcommit overlays.

``prune_rows(cat, {"audit": 365, ...})`` deletes, per kind, the rows written more than
that many days ago by the database's clock (catalog/clock.py), in batches, each batch
its own short transaction, through the index on the row's time. ``None`` keeps a kind
forever. Every worker's sweeper and every scheduler tick calls it now and then
(worker/outbox.py); several processes doing so at once delete nothing twice.

What forgetting costs: an idempotency key older than its period sent again reaches the
same job all the same (the job's dedup key ``api:<key>`` is kept with the job), and an
alert occurrence pruned while Alertmanager still repeats it is recorded again as new,
but its action reaches the job it started the first time through the job's dedup key
``alert:<fingerprint>:<startsAt>``.

History is pruned only where nothing still needs it:

- ``jobs``: succeeded or failed, created and finished before the cut, and not the job
  of an overlay still in a live chain (its recovery reads the job). Queued and running
  jobs stay whatever their age. The configuration keeps jobs at least as long as
  idempotency keys (a repeated request must find its job) and at least 8 days (the
  scheduler looks 7 days back, through slots whose dedup keys name their jobs).
- ``slots``: slots whose instant is before the cut.
- ``points``: rows of deleted or failed restore points (with their artifact rows),
  unless a point that is not deleted or failed names one as its parent. Complete,
  damaged, writing and deleting points are never pruned here: retention and ``prune``
  decide about those.
- ``drills``: finished drills whose throwaway was cleaned up and that are not the newest
  finished drill of their domain (the "last drill" metrics read it, however old).
- ``snapshots``: rows of snapshots deleted or found missing before the cut (rotation
  reads only live ones). Creating and present snapshots stay whatever their age.
- ``overlays``: journal rows of blockcommit overlays merged or abandoned before the cut
  (the journal's open rows, which recovery needs, stay whatever their age). A merged
  overlay's file left on disk by a release before this one is found and removed by the
  next backup only while its row is kept.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, delete, exists, or_, select
from sqlalchemy.orm import aliased
from virtwarden.catalog import drills, overlays, points, snapshots
from virtwarden.catalog.clock import db_later
from virtwarden.catalog.models import (
    Alert,
    ApiIdempotencyKey,
    Artifact,
    AuditRecord,
    Drill,
    Event,
    Job,
    Overlay,
    RestorePoint,
    ScheduleSlot,
    Snapshot,
)
from virtwarden.catalog.store import Catalog

DAY = 86400
BATCH = 5000
Cut = ColumnElement[Any]  # the database's time N days ago
Conditions = Callable[[Cut], list[ColumnElement[bool]]]


def _older(column: Any) -> Conditions:
    return lambda cut: [column < cut]


def _jobs(cut: Cut) -> list[ColumnElement[bool]]:
    held = select(Overlay.job_id).where(Overlay.state.in_(overlays.OPEN))
    return [Job.created_at < cut, or_(Job.finished_at.is_(None), Job.finished_at < cut),
            Job.state.in_(("succeeded", "failed")), Job.id.not_in(held)]


FORGOTTEN = (points.DELETED, points.FAILED)


def _points(cut: Cut) -> list[ColumnElement[bool]]:
    child = aliased(RestorePoint)
    return [RestorePoint.status.in_(FORGOTTEN), RestorePoint.created_at < cut,
            ~exists().where(child.parent_id == RestorePoint.id, child.status.not_in(FORGOTTEN))]


def _drills(cut: Cut) -> list[ColumnElement[bool]]:
    newer = aliased(Drill)
    done = (drills.PASSED, drills.FAILED)
    return [Drill.started_at < cut, Drill.state.in_(done), Drill.cleaned_up.is_(True),
            exists().where(newer.domain == Drill.domain, newer.state.in_(done), newer.started_at > Drill.started_at)]


def _snapshots(cut: Cut) -> list[ColumnElement[bool]]:
    return [Snapshot.state.in_((snapshots.DELETED, snapshots.MISSING)),
            or_(Snapshot.deleted_at < cut, Snapshot.deleted_at.is_(None) & (Snapshot.created_at < cut))]


def _overlays(cut: Cut) -> list[ColumnElement[bool]]:
    return [Overlay.state.in_((overlays.COMMITTED, overlays.ABANDONED)), Overlay.created_at < cut]


# kind -> (table, what makes one of its rows prunable given the cut)
KINDS: dict[str, tuple[Any, Conditions]] = {
    "audit": (AuditRecord, _older(AuditRecord.at)),
    "events": (Event, _older(Event.received_at)),
    "alerts": (Alert, _older(Alert.received_at)),
    "idempotency": (ApiIdempotencyKey, _older(ApiIdempotencyKey.created_at)),
    "jobs": (Job, _jobs),
    "slots": (ScheduleSlot, _older(ScheduleSlot.slot_at)),
    "points": (RestorePoint, _points),
    "drills": (Drill, _drills),
    "snapshots": (Snapshot, _snapshots),
    "overlays": (Overlay, _overlays),
}


def prune_rows(cat: Catalog, keep_days: dict[str, int | None], batch: int = BATCH) -> dict[str, int]:
    """Delete the rows older than their kind's days; returns how many went, by kind."""
    removed: dict[str, int] = {}
    for kind, days in keep_days.items():
        if days is not None:
            removed[kind] = _prune(cat, kind, days, batch)
    return removed


def _prune(cat: Catalog, kind: str, days: int, batch: int) -> int:
    model, conditions = KINDS[kind]
    key = model.__mapper__.primary_key[0]
    total = 0
    while True:
        with cat.session() as s:
            cut = db_later(-days * DAY)
            ids = list(s.scalars(select(key).where(*conditions(cut)).limit(batch)))
            # The conditions again: a row that changed since it was read stays. A DELETE's
            # result is a CursorResult (with rowcount); Session.execute is typed as Result.
            gone = cast(CursorResult[Any], s.execute(delete(model).where(key.in_(ids), *conditions(cut))
                                                      .execution_options(synchronize_session=False)))
            total += gone.rowcount
            if model is RestorePoint and gone.rowcount:  # SQLite cascades only with a pragma: by hand
                s.execute(delete(Artifact).where(Artifact.point_id.in_(ids),
                                                 ~exists().where(RestorePoint.id == Artifact.point_id))
                          .execution_options(synchronize_session=False))
        if len(ids) < batch:
            return total
