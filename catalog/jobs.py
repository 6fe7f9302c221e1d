"""Jobs and their leases: the database, not the broker, decides who runs a job.

A worker runs a job only after ``claim`` succeeded, and keeps it only while it renews
its lease (``heartbeat``). A message delivered twice (Redis redelivers unacknowledged
tasks after its visibility timeout) finds the job claimed or finished and does nothing.
A worker that dies stops renewing; ``reap`` finds its expired lease and puts the job
back in the queue (or marks it failed after ``max_attempts``). Every transition is a
guarded UPDATE, so two processes can never both win.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from catalog.models import DomainLock, Job, utcnow
from catalog.store import Catalog
from virtwarden.errors import JobNotFound

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    state: str
    domain: str | None
    host: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    progress: float
    progress_text: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    requested_by: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("created_at", "started_at", "finished_at"):
            out[k] = out[k].isoformat() if out[k] else None
        return out


def _count(result: Any) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; untyped on Result)."""
    return int(result.rowcount)


def _view(row: Job) -> JobView:
    return JobView(**{k: getattr(row, k) for k in JobView.__dataclass_fields__})


def create(
    cat: Catalog,
    *,
    kind: str,
    domain: str | None,
    host: str | None,
    params: dict[str, Any],
    max_attempts: int = 3,
    dedup_key: str | None = None,
    requested_by: str | None = None,
) -> JobView:
    """A new queued job. With ``dedup_key``, an existing job with that key is returned."""
    return create_once(cat, kind=kind, domain=domain, host=host, params=params, max_attempts=max_attempts,
                       dedup_key=dedup_key, requested_by=requested_by)[0]


def create_once(
    cat: Catalog,
    *,
    kind: str,
    domain: str | None,
    host: str | None,
    params: dict[str, Any],
    max_attempts: int = 3,
    dedup_key: str | None = None,
    requested_by: str | None = None,
) -> tuple[JobView, bool]:
    """Like ``create``; the flag says whether this call created the job (False: a job
    with ``dedup_key`` existed already)."""
    row = Job(
        id=str(uuid.uuid4()), kind=kind, state=QUEUED, domain=domain, host=host,
        params=params, max_attempts=max_attempts, dedup_key=dedup_key,
        requested_by=requested_by, created_at=utcnow(), attempts=0, progress=0.0,
    )
    try:
        with cat.session() as s:
            s.add(row)
    except IntegrityError:
        with cat.session() as s:
            existing = s.scalars(select(Job).where(Job.dedup_key == dedup_key)).one()
            return _view(existing), False
    return _view(row), True


def get(cat: Catalog, job_id: str) -> JobView:
    with cat.session() as s:
        row = s.get(Job, job_id)
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _view(row)


def recent(cat: Catalog, *, limit: int = 50, domain: str | None = None) -> list[JobView]:
    with cat.session() as s:
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if domain:
            q = q.where(Job.domain == domain)
        return [_view(r) for r in s.scalars(q)]


def by_dedup_key(cat: Catalog, key: str) -> JobView | None:
    """The job created with ``key``, if any (a repeated webhook finds its first job)."""
    with cat.session() as s:
        row = s.scalars(select(Job).where(Job.dedup_key == key)).first()
        return _view(row) if row else None


def last_finished(cat: Catalog, *, kind: str, domain: str, since: datetime,
                  state: str = SUCCEEDED) -> JobView | None:
    """The newest job of ``kind`` for ``domain`` that ended in ``state`` after ``since``."""
    with cat.session() as s:
        row = s.scalars(select(Job).where(Job.kind == kind, Job.domain == domain, Job.state == state,
                                          Job.finished_at > since)
                        .order_by(Job.finished_at.desc()).limit(1)).first()
        return _view(row) if row else None


@dataclass(frozen=True)
class Claim:
    ok: bool
    why: str = ""  # when not ok: "finished", "owned", "domain-busy"
    attempt: int = 0


def claim(cat: Catalog, job_id: str, owner: str, lease: float, *, lock_domain: bool) -> Claim:
    """Take the job if it is queued or its owner's lease ran out; with ``lock_domain``
    also take the domain's lock in the same transaction."""
    now = utcnow()
    expires = now + timedelta(seconds=lease)
    try:
        with cat.session() as s:
            return _claim(s, job_id, owner, now, expires, lock_domain)
    except _DomainBusy:
        return Claim(False, "domain-busy")


class _DomainBusy(Exception):
    """Raised inside the claim's transaction so that it rolls back as a whole."""


def _claim(s, job_id: str, owner: str, now: datetime, expires: datetime, lock_domain: bool) -> Claim:
    row = s.get(Job, job_id)
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    if row.state in FINISHED:
        return Claim(False, "finished")
    taken = _count(s.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(or_(Job.state == QUEUED, (Job.state == RUNNING) & (Job.lease_expires_at < now)))
        .values(state=RUNNING, lease_owner=owner, lease_expires_at=expires,
                attempts=Job.attempts + 1, started_at=now, error=None)
    ))
    if taken != 1:
        return Claim(False, "owned")
    if lock_domain and row.domain and not _lock(s, row.domain, job_id, expires, now):
        raise _DomainBusy()
    s.refresh(row)
    return Claim(True, attempt=row.attempts)


def _lock(s, domain: str, job_id: str, expires: datetime, now: datetime) -> bool:
    s.execute(delete(DomainLock).where(DomainLock.domain == domain)
              .where((DomainLock.expires_at < now) | (DomainLock.job_id == job_id)))
    existing = s.get(DomainLock, domain)
    if existing is not None:
        return False
    s.add(DomainLock(domain=domain, job_id=job_id, expires_at=expires))
    s.flush()
    return True


def heartbeat(
    cat: Catalog, job_id: str, owner: str, lease: float,
    *, progress: float | None = None, text: str | None = None,
) -> bool:
    """Renew the lease (and the domain lock); False when the job is no longer ours."""
    now = utcnow()
    expires = now + timedelta(seconds=lease)
    values: dict[str, Any] = {"lease_expires_at": expires}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if text is not None:
        values["progress_text"] = text[:255]
    with cat.session() as s:
        n = _count(s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                               Job.state == RUNNING).values(**values)))
        if n:
            s.execute(update(DomainLock).where(DomainLock.job_id == job_id).values(expires_at=expires))
        return n == 1


def finish(
    cat: Catalog, job_id: str, owner: str, *, ok: bool,
    error: str | None = None, result: dict[str, Any] | None = None,
) -> bool:
    with cat.session() as s:
        n = _count(s.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == RUNNING)
            .values(state=SUCCEEDED if ok else FAILED, error=error, result=result,
                    finished_at=utcnow(), lease_owner=None, lease_expires_at=None,
                    progress=1.0 if ok else Job.progress)
        ))
        s.execute(delete(DomainLock).where(DomainLock.job_id == job_id))
        return n == 1


def requeue(cat: Catalog, job_id: str, owner: str, why: str) -> None:
    """Put a claimed job back in the queue after a transient failure (the attempt counts)."""
    with cat.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == RUNNING)
                  .values(state=QUEUED, lease_owner=None, lease_expires_at=None, progress_text=why[:255]))
        s.execute(delete(DomainLock).where(DomainLock.job_id == job_id))


def fail_queued(cat: Catalog, job_id: str, error: str) -> None:
    """Mark a job that never ran as failed (it could not be sent to a worker)."""
    with cat.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED)
                  .values(state=FAILED, error=error, finished_at=utcnow()))


def reap(cat: Catalog) -> list[JobView]:
    """Jobs whose worker died (lease expired): requeue them, or fail them after their
    last attempt. Returns the requeued ones, to be sent to a worker again."""
    now = utcnow()
    requeued = []
    with cat.session() as s:
        stale = s.scalars(select(Job).where(Job.state == RUNNING, Job.lease_expires_at < now)).all()
        for row in stale:
            last = row.attempts >= row.max_attempts
            values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
            if last:
                values.update(state=FAILED, finished_at=now,
                              error=f"worker lost the job {row.attempts} times (last owner {row.lease_owner}); giving up")
            else:
                values.update(state=QUEUED, progress_text=f"requeued: worker {row.lease_owner} stopped renewing its lease")
            n = _count(s.execute(update(Job).where(Job.id == row.id, Job.state == RUNNING,
                                                   Job.lease_expires_at < now).values(**values)))
            if n and not last:
                requeued.append(row.id)
    return [get(cat, j) for j in requeued]


def active(cat: Catalog, kind: str, host: str) -> list[JobView]:
    """Jobs of ``kind`` for ``host`` that are queued or running, oldest first."""
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.kind == kind, Job.host == host, Job.state.in_((QUEUED, RUNNING)))
                         .order_by(Job.created_at))
        return [_view(r) for r in rows]


def lock_domain(cat: Catalog, domain: str, job_id: str) -> str | None:
    """Take ``domain``'s lock for a running job that works on several domains in turn
    (an evacuation). The lock lives as long as the job's lease, and the heartbeat
    renews both. Returns None when taken, else the id of the job that holds it."""
    now = utcnow()
    try:
        with cat.session() as s:
            row = s.get(Job, job_id)
            expires = row.lease_expires_at if row is not None and row.lease_expires_at else now + timedelta(minutes=1)
            if _lock(s, domain, job_id, expires, now):
                return None
            holder = s.get(DomainLock, domain)
            return holder.job_id if holder is not None else "another job"
    except IntegrityError:  # taken by someone else between our look and our insert
        with cat.session() as s:
            holder = s.get(DomainLock, domain)
            return holder.job_id if holder is not None else "another job"


def unlock_domain(cat: Catalog, domain: str, job_id: str) -> None:
    with cat.session() as s:
        s.execute(delete(DomainLock).where(DomainLock.domain == domain, DomainLock.job_id == job_id))


def move(cat: Catalog, job_id: str, owner: str, host: str, why: str) -> JobView | None:
    """Send a claimed job back to the queue for another host (its domain moved there);
    the attempt does not count. None when the job is no longer ours."""
    with cat.session() as s:
        n = _count(s.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == RUNNING)
            .values(state=QUEUED, host=host, lease_owner=None, lease_expires_at=None,
                    attempts=Job.attempts - 1, progress_text=why[:255])))
        s.execute(delete(DomainLock).where(DomainLock.job_id == job_id))
    return get(cat, job_id) if n == 1 else None
