"""Schedule slots in the catalog: the database, not a scheduler's memory, decides who
starts a slot.

A scheduler claims a slot by inserting its row; the unique constraint on (policy, job,
domain, slot_at) lets exactly one insert win, however many schedulers run. A row is
then moved between states only by guarded UPDATEs (``move``), so two schedulers
deciding about the same deferred row cannot both start it:

    claimed (deferred, "new") -> started (job_id set once the job exists)
                              -> skipped (window closed, or a permanent error)
                              -> deferred (waits for a limit; tried again each tick)

``started`` and ``skipped`` are final. A ``started`` row without a job belongs to a
scheduler that stopped between the two steps; the next tick finishes it (the job's
dedup key makes that safe).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, case, func, select, update
from virtwarden.catalog.jobs import QUEUED, RUNNING, JobView
from virtwarden.catalog.models import Job, ScheduleSlot, SlotTotal
from virtwarden.catalog.store import Catalog, dialect_insert, upsert
from virtwarden.catalog.views import DEFERRED, NEW, SKIPPED, STARTED, SlotRow


def _count(result: Any) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; untyped on Result)."""
    return int(result.rowcount)


def _row(r: ScheduleSlot) -> SlotRow:
    return SlotRow(**{k: getattr(r, k) for k in SlotRow.__dataclass_fields__})


@dataclass(frozen=True)
class NewSlot:
    policy: str
    job: str
    domain: str
    slot_at: datetime
    window_end: datetime


def claim_many(cat: Catalog, new: list[NewSlot], now: datetime) -> list[NewSlot]:
    """Claim slots: insert their rows (state deferred, reason NEW) in one transaction; a
    row that exists already (another scheduler's, an earlier tick's) is left as it is
    (``ON CONFLICT DO NOTHING`` on the unique constraint). The slots this call inserted."""
    if not new:
        return []
    with cat.session() as s:
        stmt = (dialect_insert(s, ScheduleSlot).on_conflict_do_nothing()
                .returning(ScheduleSlot.policy, ScheduleSlot.job, ScheduleSlot.domain, ScheduleSlot.slot_at))
        rows = [{"policy": n.policy, "job": n.job, "domain": n.domain, "slot_at": n.slot_at,
                 "window_end": n.window_end, "state": DEFERRED, "reason": NEW, "created_at": now} for n in new]
        inserted = {(r.policy, r.job, r.domain, r.slot_at) for r in s.execute(stmt, rows)}
    return [n for n in new if (n.policy, n.job, n.domain, n.slot_at) in inserted]


def recorded(cat: Catalog, since: datetime) -> set[tuple[str, str, str, datetime]]:
    """(policy, job, domain, slot_at) of the rows with slot_at >= since: slots that need
    no insert attempt."""
    with cat.session() as s:
        rows = s.execute(select(ScheduleSlot.policy, ScheduleSlot.job, ScheduleSlot.domain, ScheduleSlot.slot_at)
                         .where(ScheduleSlot.slot_at >= since))
        return {(p, j, d, at) for p, j, d, at in rows}


def last_recorded(cat: Catalog) -> datetime | None:
    """When the newest row was written: a scheduler ran at least until then, so slots
    after it that have no row were missed."""
    with cat.session() as s:
        newest: datetime | None = s.scalar(select(func.max(ScheduleSlot.created_at)))
        return newest


def deferred(cat: Catalog) -> list[SlotRow]:
    """Rows still waiting for a decision, oldest slot first."""
    return _where(cat, ScheduleSlot.state == DEFERRED)


def recent(cat: Catalog, *, since: datetime, state: str | None = None, domain: str | None = None,
           limit: int = 1000) -> list[SlotRow]:
    """Rows whose slot time is ``since`` or later, newest first (at most ``limit``)."""
    conditions = [ScheduleSlot.slot_at >= since]
    if state:
        conditions.append(ScheduleSlot.state == state)
    if domain:
        conditions.append(ScheduleSlot.domain == domain)
    with cat.session() as s:
        q = (select(ScheduleSlot).where(*conditions)
             .order_by(ScheduleSlot.slot_at.desc(), ScheduleSlot.id.desc()).limit(limit))
        return [_row(r) for r in s.scalars(q)]


def waiting(cat: Catalog) -> bool:
    """Whether any row waits for the scheduler: deferred, or started without its job."""
    with cat.session() as s:
        return s.scalar(select(ScheduleSlot.id).where(
            (ScheduleSlot.state == DEFERRED) | ((ScheduleSlot.state == STARTED) & ScheduleSlot.job_id.is_(None)))
            .limit(1)) is not None


def unsent(cat: Catalog) -> list[SlotRow]:
    """Started rows without a job: their scheduler stopped before it created the job."""
    return _where(cat, ScheduleSlot.state == STARTED, ScheduleSlot.job_id.is_(None))


def _where(cat: Catalog, *conditions: ColumnElement[bool]) -> list[SlotRow]:
    with cat.session() as s:
        q = select(ScheduleSlot).where(*conditions).order_by(ScheduleSlot.slot_at, ScheduleSlot.id)
        return [_row(r) for r in s.scalars(q)]


SKIP_CAUSES = ("missed", "waited", "failed")  # catalog.models.SlotTotal


def move(cat: Catalog, slot_id: int, *, from_state: str, to_state: str, reason: str | None,
         cause: str | None = None) -> bool:
    """Change the row's state if it is still ``from_state``; False when another
    scheduler changed it first. A move to ``skipped`` names its ``cause`` (one of
    ``SKIP_CAUSES``), counted in the same transaction (``SlotTotal``)."""
    if (to_state == SKIPPED) != (cause in SKIP_CAUSES):
        raise ValueError(f"a move to {to_state} with cause {cause!r}")
    with cat.session() as s:
        moved = s.execute(update(ScheduleSlot).where(ScheduleSlot.id == slot_id, ScheduleSlot.state == from_state)
                          .values(state=to_state, reason=reason[:4000] if reason else None)
                          .returning(ScheduleSlot.job)).scalars().all()
        if moved and cause:
            s.execute(upsert(s, SlotTotal, {"job": moved[0], "cause": cause}, {"slots": 1}, add=("slots",)))
        return len(moved) == 1


@dataclass(frozen=True)
class Start:
    """A deferred slot to start, and the job it makes (its dedup key is the slot's key)."""

    slot_id: int
    kind: str
    domain: str
    host: str
    params: dict
    dedup_key: str


def start_many(cat: Catalog, starts: list[Start], *, max_attempts: int, requested_by: str,
               resend_after: float) -> list[tuple[Start, JobView, bool]]:
    """Start deferred slots and create their jobs, all in one transaction: each slot moves
    ``deferred -> started`` only if it is still deferred (a guarded UPDATE, as ``move``:
    another scheduler that started it first keeps it), gets its job (queued: its own
    outbox entry, ``catalog.jobs``) and records it. A job that has the slot's key already
    is recorded instead of a new one. The slots this call started, with their jobs and
    whether this call created them; sending the messages is the caller's, after the
    commit."""
    from virtwarden.catalog.jobs import insert_once, new_values

    if not starts:
        return []
    by_id = {st.slot_id: st for st in starts}
    with cat.session() as s:
        won = set(s.scalars(update(ScheduleSlot)
                            .where(ScheduleSlot.id.in_(by_id), ScheduleSlot.state == DEFERRED)
                            .values(state=STARTED, reason=None).returning(ScheduleSlot.id)))
        mine = [st for st in starts if st.slot_id in won]
        created = insert_once(s, [new_values(kind=st.kind, domain=st.domain, host=st.host, params=st.params,
                                             max_attempts=max_attempts, dedup_key=st.dedup_key,
                                             requested_by=requested_by) for st in mine],
                              resend_after=resend_after)
        job_of = {st.slot_id: job.id for st, (job, _) in zip(mine, created, strict=True)}
        if job_of:  # one UPDATE for the batch (an executemany is a round trip per row on psycopg2)
            table = cast(Table, ScheduleSlot.__table__)
            s.execute(update(table).where(table.c.id.in_(job_of), table.c.job_id.is_(None))
                      .values(job_id=case(job_of, value=table.c.id)))
        return [(st, job, new) for st, (job, new) in zip(mine, created, strict=True)]


def attach_job(cat: Catalog, slot_id: int, job_id: str, reason: str | None = None) -> bool:
    """Record the job a started slot made (once)."""
    with cat.session() as s:
        result = s.execute(update(ScheduleSlot)
                           .where(ScheduleSlot.id == slot_id, ScheduleSlot.state == STARTED,
                                  ScheduleSlot.job_id.is_(None))
                           .values(job_id=job_id, reason=reason))
        return _count(result) == 1


def release(cat: Catalog, slot_id: int, reason: str) -> bool:
    """A started slot whose job could not be created goes back to deferred (tried again
    while its window is open)."""
    with cat.session() as s:
        result = s.execute(update(ScheduleSlot)
                           .where(ScheduleSlot.id == slot_id, ScheduleSlot.state == STARTED,
                                  ScheduleSlot.job_id.is_(None))
                           .values(state=DEFERRED, reason=reason[:4000]))
        return _count(result) == 1


def listing(cat: Catalog, *, since: datetime | None = None, domain: str | None = None,
            limit: int = 1000) -> list[SlotRow]:
    with cat.session() as s:
        q = select(ScheduleSlot).order_by(ScheduleSlot.slot_at, ScheduleSlot.policy, ScheduleSlot.job,
                                          ScheduleSlot.domain).limit(limit)
        if since is not None:
            q = q.where(ScheduleSlot.slot_at >= since)
        if domain is not None:
            q = q.where(ScheduleSlot.domain == domain)
        return [_row(r) for r in s.scalars(q)]


def busy_jobs(cat: Catalog, kinds: Iterable[str]) -> list[JobView]:
    """Queued and running jobs of ``kinds``: what the concurrency limits count."""
    with cat.session() as s:
        rows = s.scalars(select(Job).where(Job.state.in_((QUEUED, RUNNING)), Job.kind.in_(list(kinds))))
        return [JobView(**{k: getattr(r, k) for k in JobView.__dataclass_fields__}) for r in rows]


def job_with_key(cat: Catalog, dedup_key: str) -> str | None:
    """The id of the job created under ``dedup_key``, if any."""
    with cat.session() as s:
        found: str | None = s.scalar(select(Job.id).where(Job.dedup_key == dedup_key))
        return found
