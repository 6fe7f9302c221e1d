"""Jobs and their leases: the database, not the broker, decides who runs a job.

A worker runs a job only after ``claim`` succeeded, and keeps it only while it renews
its lease (``heartbeat``). A message delivered twice (Redis redelivers unacknowledged
tasks after its visibility timeout) finds the job claimed or finished and does nothing.
A worker that dies stops renewing; ``reap`` finds its expired lease and puts the job
back in the queue (or, after ``max_attempts``, gives it up: its recovery runs, then it
fails). Every transition is a guarded UPDATE, so two processes can never both win.

Three rules make this hold on a bad day:
- Each claim raises the job's fencing token (``catalog.fencing``); an attempt's later
  writes are conditional on its token, so a paused worker that wakes after a takeover
  changes nothing.
- Leases are set and judged by the database's clock (``catalog.clock``), never by a
  worker's: a host whose clock runs ahead does not take over a live job.
- The job row is its own outbox entry: ``dispatch_at`` says by when a message for a
  queued job should have reached a worker. A message can be lost (a send failed while
  the broker was down, a Redis without persistence restarted); ``due_for_send`` lists
  such jobs and a sweeper in every worker and scheduler sends them again. A duplicate
  message is harmless: it finds the job claimed or finished.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from virtwarden.catalog.clock import db_later, db_now
from virtwarden.catalog.fencing import Fence
from virtwarden.catalog.models import DomainLock, Job, JobTotal
from virtwarden.catalog.store import Catalog, upsert
from virtwarden.catalog.views import FAILED, FINISHED, QUEUED, RUNNING, SUCCEEDED, JobView

from virtwarden import faults
from virtwarden.errors import JobNotFound

# Upper bounds (seconds) of the duration buckets the metrics' histogram reports.
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800)
DEFAULT_RESEND_AFTER = 60.0  # seconds a queued job's message may take to reach a worker
HEARTBEAT_WRITING = "heartbeat-writing"  # test fault point: inside the heartbeat's transaction


def _count(result: Any) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; untyped on Result)."""
    return int(result.rowcount)


def _view(row: Job) -> JobView:
    return JobView(**{k: getattr(row, k) for k in JobView.__dataclass_fields__})


def _inserted(s: Session, new: list[dict[str, Any]], resend_after: float) -> dict[str, JobView]:
    """Insert new queued jobs (``new_values`` each) with one INSERT, their times from the
    database's clock, and their views: built from the values given and the times the
    INSERT returned, so that a batch of 1,000 new jobs (the scheduler's midnight tick)
    is not read back (nor its parameters decoded again)."""
    table = cast(Table, Job.__table__)
    stmt = insert(table).values(**times(resend_after)).returning(table.c.id, table.c.created_at)
    created = {row[0]: row[1] for row in s.connection().execute(stmt, new)}
    unset = {k: None for k in JobView.__dataclass_fields__}
    return {v["id"]: JobView(**{**unset, **{k: v[k] for k in unset if k in v}, "created_at": created[v["id"]]})
            for v in new}


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
    resend_after: float = DEFAULT_RESEND_AFTER,
) -> JobView:
    """A new queued job. With ``dedup_key``, an existing job with that key is returned."""
    return create_once(cat, kind=kind, domain=domain, host=host, params=params, max_attempts=max_attempts,
                       dedup_key=dedup_key, requested_by=requested_by, resend_after=resend_after)[0]


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
    resend_after: float = DEFAULT_RESEND_AFTER,
) -> tuple[JobView, bool]:
    """Like ``create``; the flag says whether this call created the job (False: a job
    with ``dedup_key`` existed already). The row is the outbox entry: if its message
    is not consumed within ``resend_after`` seconds (the send failed, the broker lost
    it), ``due_for_send`` lists it again."""
    row = new_row(kind=kind, domain=domain, host=host, params=params, max_attempts=max_attempts,
                  dedup_key=dedup_key, requested_by=requested_by, resend_after=resend_after)
    try:
        with cat.session() as s:
            s.add(row)
            s.flush()
            s.refresh(row)
    except IntegrityError:
        with cat.session() as s:
            existing = s.scalars(select(Job).where(Job.dedup_key == dedup_key)).one()
            return _view(existing), False
    return _view(row), True


def create_many(cat: Catalog, values: list[dict[str, Any]], *,
                resend_after: float = DEFAULT_RESEND_AFTER) -> list[tuple[JobView, bool]]:
    """``create_once`` for many jobs (``new_values`` each) in one transaction and one
    INSERT: for each, in order, its job and whether this call created it (False: a job
    with its ``dedup_key`` existed already, or came earlier in ``values``). A key that
    another process inserts between this call's look-up and its INSERT fails the whole
    call (IntegrityError, nothing created): the caller creates them one at a time."""
    with cat.session() as s:
        return insert_once(s, values, resend_after=resend_after)


def insert_once(s: Session, values: list[dict[str, Any]], *, resend_after: float) -> list[tuple[JobView, bool]]:
    """``create_many`` inside the caller's transaction (``slots.start_many`` records the
    slots' jobs in the same one)."""
    keys = [v["dedup_key"] for v in values if v["dedup_key"]]
    known = {j.dedup_key: j for j in s.scalars(select(Job).where(Job.dedup_key.in_(keys)))} if keys else {}
    first: dict[str, str] = {}  # dedup key -> the id of the job made for it in this call
    new: list[dict[str, Any]] = []
    for v in values:
        key = v["dedup_key"]
        if key and (key in known or key in first):
            continue
        if key:
            first[key] = v["id"]
        new.append(v)
    made = _inserted(s, new, resend_after) if new else {}
    result: list[tuple[JobView, bool]] = []
    for v in values:
        key = v["dedup_key"]
        if key in known:
            result.append((_view(known[key]), False))
        elif v["id"] in made:
            result.append((made[v["id"]], True))
        else:  # a repeated key in this call: its first job
            result.append((made[first[key]], False))
    return result


def new_values(*, kind: str, domain: str | None, host: str | None, params: dict[str, Any], max_attempts: int,
               dedup_key: str | None, requested_by: str | None) -> dict[str, Any]:
    """A new queued job's columns, but for its times (``times``: the database's)."""
    return {"id": str(uuid.uuid4()), "kind": kind, "state": QUEUED, "domain": domain, "host": host, "params": params,
            "max_attempts": max_attempts, "dedup_key": dedup_key, "requested_by": requested_by, "attempts": 0,
            "progress": 0.0, "sends": 0, "fence": 0}


def times(resend_after: float) -> dict[str, Any]:
    """A new job's times, by the database's clock: created now, its message due within
    ``resend_after`` seconds (the outbox)."""
    return {"created_at": db_now(), "dispatch_at": db_later(resend_after)}


def new_row(*, resend_after: float, **values: Any) -> Job:
    """A queued job's row (``new_values``' arguments), to be added in a session."""
    return Job(**new_values(**values), **times(resend_after))


def mark_sent_many(cat: Catalog, sent: list[JobView], *, resend_after: float) -> int:
    """``mark_sent`` for many jobs in one transaction; how many were still queued."""
    by_sends: dict[int, list[str]] = {}  # one statement per earlier count of sends (nearly always 0)
    for j in sent:
        by_sends.setdefault(j.sends, []).append(j.id)
    with cat.session() as s:
        return sum(_count(s.execute(update(Job).where(Job.id.in_(ids), Job.state == QUEUED, Job.sends == sends)
                                    .values(sends=Job.sends + 1,
                                            dispatch_at=db_later(resend_after * 2 ** min(sends, 6)))
                                    .execution_options(synchronize_session=False)))
                   for sends, ids in by_sends.items())


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
    why: str = ""  # when not ok: "finished", "owned", "domain-busy", "other-host"
    attempt: int = 0
    fence: Fence | None = None  # when ok: this attempt's hold on the job
    give_up: str | None = None  # when ok: the job only runs its recovery, then fails with this


def claim(cat: Catalog, job_id: str, owner: str, lease: float, *, lock_domain: bool,
          host: str | None = None) -> Claim:
    """Take the job if it is queued or its owner's lease ran out (by the database's
    clock); with ``lock_domain`` also take the domain's lock in the same transaction.
    With ``host``, only if the job is (still) for that host: a message from one host's
    queue never runs a job that moved to another host meanwhile. Every successful
    claim raises the job's fencing token."""
    try:
        with cat.session() as s:
            return _claim(s, job_id, owner, lease, lock_domain, host)
    except _DomainBusy:
        return Claim(False, "domain-busy")


class _DomainBusy(Exception):
    """Raised inside the claim's transaction so that it rolls back as a whole."""


def _claim(s, job_id: str, owner: str, lease: float, lock_domain: bool, host: str | None) -> Claim:
    row = s.get(Job, job_id)
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    if row.state in FINISHED:
        return Claim(False, "finished")
    if host is not None and row.host is not None and row.host != host:
        return Claim(False, "other-host")
    taken = _count(s.execute(
        update(Job)
        .where(Job.id == job_id, Job.host == row.host)
        .where(or_(Job.state == QUEUED, (Job.state == RUNNING) & (Job.lease_expires_at < db_now())))
        .values(state=RUNNING, lease_owner=owner, lease_expires_at=db_later(lease), fence=Job.fence + 1,
                attempts=Job.attempts + 1, started_at=db_now(), error=None, dispatch_at=None)
    ))
    if taken != 1:
        return Claim(False, "owned")
    s.refresh(row)
    if lock_domain and row.domain and not _lock(s, row.domain, job_id, row.lease_expires_at):
        raise _DomainBusy()
    return Claim(True, attempt=row.attempts, fence=Fence(job_id, row.fence, lease), give_up=row.give_up)


def _lock(s, domain: str, job_id: str, expires: datetime | Any) -> bool:
    s.execute(delete(DomainLock).where(DomainLock.domain == domain)
              .where((DomainLock.expires_at < db_now()) | (DomainLock.job_id == job_id)))
    existing = s.get(DomainLock, domain)
    if existing is not None:
        return False
    s.add(DomainLock(domain=domain, job_id=job_id, expires_at=expires))
    s.flush()
    return True


def heartbeat(
    cat: Catalog, fence: Fence, *, progress: float | None = None, text: str | None = None,
) -> bool:
    """Renew the lease (and the domain lock) by the database's clock; False when the
    attempt no longer holds the job."""
    values: dict[str, Any] = {"lease_expires_at": db_later(fence.lease_seconds)}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if text is not None:
        values["progress_text"] = text[:255]
    with cat.session() as s:
        n = _count(s.execute(update(Job).where(*_held(fence)).values(**values)))
        if n:
            s.execute(update(DomainLock).where(DomainLock.job_id == fence.job_id)
                      .values(expires_at=db_later(fence.lease_seconds)))
        faults.pause_point(HEARTBEAT_WRITING)
        return n == 1


def _held(fence: Fence) -> tuple[Any, ...]:
    """The condition under which ``fence`` still holds its job."""
    return Job.id == fence.job_id, Job.fence == fence.token, Job.state == RUNNING


def finish(
    cat: Catalog, fence: Fence, *, ok: bool,
    error: str | None = None, result: dict[str, Any] | None = None,
) -> bool:
    """Record the outcome; False (nothing recorded) when the attempt lost the job."""
    with cat.session() as s:
        n = _count(s.execute(
            update(Job).where(*_held(fence))
            .values(state=SUCCEEDED if ok else FAILED, error=error, result=result,
                    finished_at=db_now(), lease_owner=None, lease_expires_at=None, give_up=None,
                    progress=1.0 if ok else Job.progress)
        ))
        if n:
            s.execute(delete(DomainLock).where(DomainLock.job_id == fence.job_id))
            _tally(s, [fence.job_id])
        return n == 1


def requeue(cat: Catalog, fence: Fence, why: str, *, delay: float, resend_after: float) -> bool:
    """Put a claimed job back in the queue after a transient failure (the attempt counts);
    its next message is due in ``delay`` seconds. False when the attempt lost the job."""
    with cat.session() as s:
        n = _count(s.execute(
            update(Job).where(*_held(fence))
            .values(state=QUEUED, lease_owner=None, lease_expires_at=None, progress_text=why[:255],
                    dispatch_at=db_later(delay + resend_after))))
        if n:
            s.execute(delete(DomainLock).where(DomainLock.job_id == fence.job_id))
        return n == 1


def fail_queued(cat: Catalog, job_id: str, error: str) -> None:
    """Mark a job that never ran as failed (it could not be sent to a worker)."""
    with cat.session() as s:
        n = _count(s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED)
                             .values(state=FAILED, error=error, finished_at=db_now(), dispatch_at=None)))
        if n:
            _tally(s, [job_id])


def reap(cat: Catalog, *, recoverable: Callable[[str], bool] = lambda _kind: False) -> list[JobView]:
    """Jobs whose worker stopped renewing its lease (expired by the database's clock): put
    them back in the queue, or, after their last attempt, give them up. A job whose kind
    has a recovery (``recoverable``) is queued once more to run only that recovery and
    then fail; any other fails at once. Returns the queued ones. They are due for sending
    at once (``due_for_send``): the sweep that reaped them sends them next, and every
    sweep after while the broker is away. Waiting a resend interval here would add it to
    every takeover (a minute by default, on top of the lease).

    Every change is a guarded UPDATE on the expired lease, so a worker that renews at the
    same moment keeps its job, and two reapers never both act."""
    queued = []
    with cat.session() as s:
        stale = s.scalars(select(Job).where(Job.state == RUNNING, Job.lease_expires_at < db_now())).all()
        for row in stale:
            values = _reaped(row, recoverable(row.kind))
            n = _count(s.execute(update(Job).where(Job.id == row.id, Job.state == RUNNING, Job.fence == row.fence,
                                                   Job.lease_expires_at < db_now())
                                 .values(lease_owner=None, lease_expires_at=None, **values)))
            if n and values["state"] == QUEUED:
                # due now (a second ago, whatever the clock's resolution): sent by this sweep
                s.execute(update(Job).where(Job.id == row.id).values(dispatch_at=db_later(-1)))
                queued.append(row.id)
            if n:
                s.execute(delete(DomainLock).where(DomainLock.job_id == row.id))
            if n and values["state"] == FAILED:
                _tally(s, [row.id])
    return [get(cat, j) for j in queued]


def _tally(s: Any, job_ids: list[str]) -> None:
    """Add jobs that have just ended to ``job_totals``, in the transaction that ended them:
    a job is counted exactly when its end is recorded. Each add is one atomic upsert, so
    workers finishing jobs at the same moment lose no count."""
    rows = s.execute(select(Job.kind, Job.state, Job.created_at, Job.started_at, Job.finished_at, Job.result)
                     .where(Job.id.in_(job_ids))).all()
    for kind, state, created, started, finished, result in rows:
        seconds = max(0.0, (finished - (started or created)).total_seconds()) if finished else 0.0
        le = next((str(b) for b in DURATION_BUCKETS if seconds <= b), "+Inf")
        size = result.get("size_bytes") if isinstance(result, dict) else None
        add = {"jobs": 1, "seconds": seconds, "bytes": size if isinstance(size, int) and size > 0 else 0}
        s.execute(upsert(s, JobTotal, {"kind": kind, "outcome": state, "le": le}, add, add=tuple(add)))


def _reaped(row: Job, recoverable: bool) -> dict[str, Any]:
    lost = f"worker {row.lease_owner} stopped renewing its lease"
    if row.give_up is not None:  # its recovery attempt was lost too
        return {"state": FAILED, "finished_at": db_now(), "give_up": None,
                "error": f"{row.give_up}; its recovery did not finish either ({lost}): leftovers are cleaned up "
                         "by the next job of the domain and the sweep of unfinished points"}
    if row.attempts < row.max_attempts:
        return {"state": QUEUED, "progress_text": f"requeued: {lost}"}
    error = f"worker lost the job {row.attempts} times (last owner {row.lease_owner}); giving up"
    if recoverable:
        return {"state": QUEUED, "give_up": error, "progress_text": f"giving up: {lost}; running its recovery"}
    return {"state": FAILED, "finished_at": db_now(), "error": error}


def due_for_send(cat: Catalog, *, limit: int = 200) -> list[JobView]:
    """Queued jobs whose message should have reached a worker by now and did not
    (``dispatch_at`` passed): the outbox's backlog, oldest first."""
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.state == QUEUED, Job.dispatch_at < db_now())
                         .order_by(Job.dispatch_at).limit(limit))
        return [_view(r) for r in rows]


def mark_sent(cat: Catalog, job: JobView, *, resend_after: float) -> bool:
    """Record a send of a queued job: the next one is due after ``resend_after`` seconds,
    doubled for every earlier send (at most 64 times), so a job that waits long in a
    busy queue gets few duplicate messages. False when another sweeper sent it first
    or the job left the queue."""
    return mark_sent_many(cat, [job], resend_after=resend_after) == 1


def postpone(cat: Catalog, job_id: str, seconds: float) -> None:
    """A message for a queued job was seen and will come back in ``seconds`` (its domain
    is busy): it is not lost, so the sweeper leaves it alone until then."""
    with cat.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED).values(dispatch_at=db_later(seconds)))


def active(cat: Catalog, kind: str, host: str) -> list[JobView]:
    """Jobs of ``kind`` for ``host`` that are queued or running, oldest first."""
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.kind == kind, Job.host == host, Job.state.in_((QUEUED, RUNNING)))
                         .order_by(Job.created_at))
        return [_view(r) for r in rows]


def unfinished_by_key(cat: Catalog, prefix: str) -> list[JobView]:
    """Queued or running jobs whose dedup key starts with ``prefix``, oldest first."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.dedup_key.like(f"{escaped}%", escape="\\"),
                                           Job.state.in_((QUEUED, RUNNING))).order_by(Job.created_at))
        return [_view(r) for r in rows]


def lock_domain(cat: Catalog, domain: str, job_id: str) -> str | None:
    """Take ``domain``'s lock for a running job that works on several domains in turn
    (an evacuation). The lock lives as long as the job's lease, and the heartbeat
    renews both. Returns None when taken, else the id of the job that holds it."""
    try:
        with cat.session() as s:
            row = s.get(Job, job_id)
            expires = row.lease_expires_at if row is not None and row.lease_expires_at else db_later(60)
            if _lock(s, domain, job_id, expires):
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


def move(cat: Catalog, fence: Fence, host: str, why: str, *, resend_after: float) -> JobView | None:
    """Send a claimed job back to the queue for another host (its domain moved there);
    the attempt does not count. None when the attempt no longer holds the job."""
    with cat.session() as s:
        n = _count(s.execute(
            update(Job).where(*_held(fence))
            .values(state=QUEUED, host=host, lease_owner=None, lease_expires_at=None,
                    attempts=Job.attempts - 1, progress_text=why[:255], dispatch_at=db_later(resend_after))))
        if n:
            s.execute(delete(DomainLock).where(DomainLock.job_id == fence.job_id))
    return get(cat, fence.job_id) if n == 1 else None


RESTORING = ("restore", "restore-as-domain", "restore-in-place", "drill")


def points_being_restored(cat: Catalog, domain: str) -> set[str]:
    """Restore points that queued or running restores and drills of ``domain`` will read:
    a prune must keep them (and what their chain needs) until those jobs end."""
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.domain == domain, Job.kind.in_(RESTORING),
                                           Job.state.in_((QUEUED, RUNNING))))
        return {str(r.params.get("point")) for r in rows if isinstance(r.params, dict) and r.params.get("point")}
