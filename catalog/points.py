"""Restore points and their artifacts in the catalog.

A point is created ``writing`` when its backup starts and becomes ``complete`` only
after every artifact is stored and verified and its manifest is written (last).
Anything else (``writing`` left by a dead worker, ``failed``, ``damaged``) is never
offered for a restore and never used as the parent of an incremental.

``damaged``: a verification (tasks/verify.py) found the point's data missing or not
matching its checksums; every point built on it is damaged with it (``mark_damaged``).
The rows stay, with what was found (``damage``), until retention would have removed
them (tasks/prune.py).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from virtwarden.catalog import repositories
from virtwarden.catalog.clock import db_now
from virtwarden.catalog.models import Artifact, Job, RestorePoint
from virtwarden.catalog.store import Catalog
from virtwarden.catalog.views import COMPLETE, DAMAGED, DELETED, DELETING, FAILED, WRITING, ArtifactView, PointView

from virtwarden.errors import JobFailed, RestorePointNotFound


def _view(row: RestorePoint) -> PointView:
    names = [f for f in PointView.__dataclass_fields__ if f != "artifacts"]
    arts = tuple(ArtifactView(a.target, a.key, a.size_bytes, a.sha256, a.virtual_size) for a in row.artifacts)
    return PointView(**{f: getattr(row, f) for f in names}, artifacts=arts)


def begin(cat: Catalog, **fields: Any) -> PointView:
    """A new point, ``writing``. Its ``created_at`` is the database's time: chain order
    never depends on the clock of the host that made the point."""
    row = RestorePoint(status=WRITING, created_at=db_now(), size_bytes=0, **fields)
    with cat.session() as s:
        s.add(row)
        s.flush()
        s.refresh(row)
        return _view(row)


def complete(cat: Catalog, point_id: str, artifacts: list[ArtifactView], *, consistency: str,
             manifest_sha256: str | None = None) -> PointView:
    """``writing -> complete``, with its artifacts; a compare-and-set, so a point that
    failed meanwhile (its attempt was taken over and recovered) is never completed, nor
    an incremental whose parent a verification found damaged while it was written."""
    parent = aliased(RestorePoint)
    parent_lost = exists().where(parent.id == RestorePoint.parent_id, parent.status != COMPLETE)
    with cat.session() as s:
        done = s.execute(update(RestorePoint)
                         .where(RestorePoint.id == point_id, RestorePoint.status == WRITING, ~parent_lost)
                         .values(status=COMPLETE, completed_at=db_now(), consistency=consistency,
                                 size_bytes=sum(a.size_bytes for a in artifacts), manifest_sha256=manifest_sha256))
        if not getattr(done, "rowcount", 0):
            _not_completed(s, point_id)
        row = s.get(RestorePoint, point_id)
        assert row is not None
        row.artifacts = [Artifact(target=a.target, key=a.key, size_bytes=a.size_bytes,
                                  sha256=a.sha256, virtual_size=a.virtual_size) for a in artifacts]
        s.flush()
        s.refresh(row)
        return _view(row)


def _not_completed(s: Any, point_id: str) -> None:  # a Session
    row = s.get(RestorePoint, point_id)
    if row is None:
        raise RestorePointNotFound(f"no restore point {point_id!r}")
    if row.status != WRITING:
        raise JobFailed(f"restore point {point_id} is {row.status}, not writing: it cannot be completed")
    up = s.get(RestorePoint, row.parent_id)
    raise JobFailed(f"restore point {point_id} is not completed: the point it is built on, {row.parent_id}, is "
                    f"{up.status if up else 'gone'} ({(up.damage if up else None) or 'found while it was written'});"
                    " the next backup starts a new chain")


def fail(cat: Catalog, point_id: str, reason: str) -> bool:
    """``writing -> failed``; True when this call changed it. A point that is complete
    (or anything but writing) is left as it is: only then may its data be removed."""
    with cat.session() as s:
        done = s.execute(update(RestorePoint).where(RestorePoint.id == point_id, RestorePoint.status == WRITING)
                         .values(status=FAILED, reason=reason[:2000]))
        return _went(s, point_id, done)


def get(cat: Catalog, point_id: str) -> PointView:
    with cat.session() as s:
        row = s.get(RestorePoint, point_id)
        if row is None:
            raise RestorePointNotFound(f"no restore point {point_id!r}")
        return _view(row)


def for_domain(cat: Catalog, domain: str, *, storage: str | None = None,
               statuses: tuple[str, ...] | None = None) -> list[PointView]:
    """Points of a domain (by name), oldest first."""
    with cat.session() as s:
        q = select(RestorePoint).where(RestorePoint.domain == domain)
        if storage:
            q = q.where(RestorePoint.storage == storage)
        if statuses:
            q = q.where(RestorePoint.status.in_(statuses))
        return [_view(r) for r in s.scalars(q.order_by(RestorePoint.created_at, RestorePoint.seq))]


def chain_head(cat: Catalog, domain_uuid: str, storage: str, strategy: str) -> PointView | None:
    """The newest complete point an incremental can follow, for this domain and target."""
    with cat.session() as s:
        row = s.scalars(
            select(RestorePoint)
            .where(RestorePoint.domain_uuid == domain_uuid, RestorePoint.storage == storage,
                   RestorePoint.strategy == strategy, RestorePoint.status == COMPLETE)
            .order_by(RestorePoint.created_at.desc(), RestorePoint.seq.desc()).limit(1)
        ).first()
        return _view(row) if row else None


def checkpoints_of(cat: Catalog, domain_uuid: str, statuses: tuple[str, ...]) -> set[str]:
    """The checkpoint (or blockcommit run token) names of a domain's points in ``statuses``."""
    with cat.session() as s:
        names = s.scalars(select(RestorePoint.checkpoint).where(RestorePoint.domain_uuid == domain_uuid,
                                                                RestorePoint.status.in_(statuses)).distinct())
        return {n for n in names if n}


def heads(cat: Catalog, domain_uuid: str) -> list[PointView]:
    """The newest complete point of every chain of a domain (one per target and strategy)."""
    newest: dict[tuple[str, str], PointView] = {}
    with cat.session() as s:
        rows = s.scalars(select(RestorePoint).where(RestorePoint.domain_uuid == domain_uuid,
                                                    RestorePoint.status == COMPLETE)
                         .order_by(RestorePoint.created_at, RestorePoint.seq))
        for r in rows:
            newest[(r.storage, r.strategy)] = _view(r)
    return list(newest.values())


def chain_to(cat: Catalog, point_id: str) -> list[PointView]:
    """The full and every incremental up to ``point_id``, in order; all must be complete."""
    chain: list[PointView] = []
    current: str | None = point_id
    while current:
        p = get(cat, current)
        if not p.usable:
            raise RestorePointNotFound(
                f"restore point {p.id} is {p.status}, not complete: it cannot be restored"
                + (f" (needed by {point_id})" if p.id != point_id else "")
                + (f"; {p.damage}" if p.damage else ""))
        chain.append(p)
        current = p.parent_id
    chain.reverse()
    if chain[0].level != "full":
        raise RestorePointNotFound(f"chain of {point_id} does not start with a full backup")
    return chain


def unfinished_of_ended_jobs(cat: Catalog, *, limit: int = 100) -> list[PointView]:
    """Points still ``writing`` whose job ended (or is gone): nothing will complete them
    (completing needs the job running), and nothing else cleans them up."""
    live = select(Job.id).where(Job.state.in_(("queued", "running")))
    with cat.session() as s:
        rows = s.scalars(select(RestorePoint).where(RestorePoint.status == WRITING)
                         .where((RestorePoint.job_id.is_(None)) | RestorePoint.job_id.not_in(live))
                         .order_by(RestorePoint.created_at).limit(limit))
        return [_view(r) for r in rows]


def fail_unfinished(cat: Catalog, point_id: str, reason: str) -> bool:
    """``writing -> failed`` for a point whose job ended, checked in the same statement;
    True when this call changed it (then, and only then, its data may go)."""
    live = select(Job.id).where(Job.state.in_(("queued", "running")))
    with cat.session() as s:
        done = s.execute(update(RestorePoint)
                         .where(RestorePoint.id == point_id, RestorePoint.status == WRITING)
                         .where((RestorePoint.job_id.is_(None)) | RestorePoint.job_id.not_in(live))
                         .values(status=FAILED, reason=reason[:2000]))
        return _went(s, point_id, done)


def writing_for_job(cat: Catalog, job_id: str) -> list[PointView]:
    with cat.session() as s:
        rows = s.scalars(select(RestorePoint).where(RestorePoint.job_id == job_id,
                                                    RestorePoint.status == WRITING))
        return [_view(r) for r in rows]


# A prune is removing the point: set before its manifest goes, so that a point whose
# storage may be half gone is never listed as complete; the next prune finishes it.


def transition(cat: Catalog, point_id: str, frm: tuple[str, ...], to: str) -> bool:
    """Set the status to ``to`` if it is one of ``frm`` (a guarded update, so two prunes
    or a prune and a backup never both win); True when this call changed it."""
    with cat.session() as s:
        done = s.execute(update(RestorePoint).where(RestorePoint.id == point_id, RestorePoint.status.in_(frm))
                         .values(status=to))
        return _went(s, point_id, done) if to == DELETED else bool(getattr(done, "rowcount", 0))


def _went(s: Session, point_id: str, done: Any) -> bool:
    """After a point was failed or deleted in this transaction (``done``: the update):
    its chunks, if it is a format-2 point, may be unused now (catalog.repositories).
    Whether the update changed the point."""
    if not getattr(done, "rowcount", 0):
        return False
    row = s.execute(select(RestorePoint.storage, RestorePoint.format).where(RestorePoint.id == point_id)).one()
    if row.format == 2:
        repositories.note_garbage(s, row.storage)
    return True


def newest_host(cat: Catalog, storage: str) -> str | None:
    """The host that made the newest point stored on ``storage`` (None: no point)."""
    with cat.session() as s:
        return s.scalars(select(RestorePoint.host).where(RestorePoint.storage == storage)
                         .order_by(RestorePoint.created_at.desc()).limit(1)).first()


def domains_with_points(cat: Catalog,
                        statuses: tuple[str, ...] = (COMPLETE, DELETING, FAILED, DAMAGED)) -> list[str]:
    """Names of the domains that have points in one of ``statuses``, sorted."""
    with cat.session() as s:
        q = select(RestorePoint.domain).where(RestorePoint.status.in_(statuses)).distinct()
        return sorted(s.scalars(q))


# --- verification ----------------------------------------------------------------------
def mark_damaged(cat: Catalog, point_id: str, damage: str) -> list[str]:
    """``complete -> damaged`` for the point and every complete point built on it (its
    descendants in the chain), in one transaction; the ids this call changed, the point
    first. Empty when the point is not complete any more (a prune took it meanwhile, or
    an earlier verification marked it)."""
    with cat.session() as s:
        done = s.execute(update(RestorePoint).where(RestorePoint.id == point_id, RestorePoint.status == COMPLETE)
                         .values(status=DAMAGED, damage=damage[:2000]))
        if not getattr(done, "rowcount", 0):
            return []
        row = s.get(RestorePoint, point_id)
        assert row is not None
        chain = list(s.scalars(select(RestorePoint).where(RestorePoint.chain_id == row.chain_id,
                                                          RestorePoint.status == COMPLETE)))
        below = _descendants(point_id, [(r.id, r.parent_id) for r in chain])
        if below:
            s.execute(update(RestorePoint).where(RestorePoint.id.in_(below), RestorePoint.status == COMPLETE)
                      .values(status=DAMAGED, damage=f"built on damaged restore point {point_id}: {damage}"[:2000]))
        return [point_id, *below]


def _descendants(root: str, edges: list[tuple[str, str | None]]) -> list[str]:
    """Ids whose parent chain leads to ``root``, nearest first (edges: (id, parent_id))."""
    children: dict[str, list[str]] = {}
    for child, parent in edges:
        if parent:
            children.setdefault(parent, []).append(child)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            if child not in found and child != root:
                found.append(child)
                todo.append(child)
    return found


def record_verified(cat: Catalog, point_ids: list[str]) -> None:
    """A verification re-read these points' data and found it intact: now (the
    database's time) is when they were last verified."""
    if point_ids:
        with cat.session() as s:
            s.execute(update(RestorePoint).where(RestorePoint.id.in_(point_ids)).values(verified_at=db_now()))


def damaged_since(cat: Catalog, domain_uuid: str, storage: str, strategy: str,
                  head: PointView | None) -> PointView | None:
    """The newest damaged point of the chain group that ends the chain ``head`` belongs
    to (in it, or made after it); a backup must not continue that chain."""
    with cat.session() as s:
        q = select(RestorePoint).where(RestorePoint.domain_uuid == domain_uuid, RestorePoint.storage == storage,
                                       RestorePoint.strategy == strategy, RestorePoint.status == DAMAGED)
        if head is not None:
            q = q.where((RestorePoint.chain_id == head.chain_id) | (RestorePoint.created_at > head.created_at))
        row = s.scalars(q.order_by(RestorePoint.created_at.desc(), RestorePoint.seq.desc()).limit(1)).first()
        return _view(row) if row else None


# --- rebuilding the catalog from the repository -----------------------------------------
def on_storage(cat: Catalog, storage: str) -> list[PointView]:
    """Every point the catalog has on ``storage``, whatever its status, oldest first."""
    with cat.session() as s:
        rows = s.scalars(select(RestorePoint).where(RestorePoint.storage == storage)
                         .order_by(RestorePoint.created_at, RestorePoint.seq))
        return [_view(r) for r in rows]


def add_complete(cat: Catalog, point: PointView) -> bool:
    """Insert ``point`` (with its artifacts) as it is described, status and times
    included; False when a point with its id exists already (it is left as it is)."""
    names = [f for f in PointView.__dataclass_fields__ if f != "artifacts"]
    row = RestorePoint(**{f: getattr(point, f) for f in names})
    row.artifacts = [Artifact(target=a.target, key=a.key, size_bytes=a.size_bytes, sha256=a.sha256,
                              virtual_size=a.virtual_size) for a in point.artifacts]
    try:
        with cat.session() as s:
            s.add(row)
    except IntegrityError:
        return False
    return True
