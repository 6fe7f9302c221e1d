"""Restore drills in the catalog: one row per drill job (its id is the job's id).

A row is ``running`` from the moment the drill picked its point until it ends
``passed`` or ``failed``; each check is appended to ``checks`` as it completes, so an
operator watching a long drill sees how far it got. ``cleaned_up`` turns true only
once the throwaway domain and every restored file are gone.

A job that is attempted again (its worker died) starts its row again: the attempt's
``started_at`` is its token, and every later write of that attempt is guarded by it,
so an attempt that lost its job to another worker can never overwrite the new one.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from virtwarden.catalog.clock import db_now
from virtwarden.catalog.models import Drill, Job, utcnow
from virtwarden.catalog.store import Catalog
from virtwarden.catalog.views import FAILED, PASSED, RUNNING, DrillView

from virtwarden.errors import NotFound


def _view(row: Drill) -> DrillView:
    return DrillView(**{k: getattr(row, k) for k in DrillView.__dataclass_fields__})


def begin(cat: Catalog, *, drill_id: str, domain: str, host: str, point_id: str | None,
          throwaway: str) -> DrillView:
    """Start (or, for a new attempt of the same job, start again) a drill's row."""
    with cat.session() as s:
        row = s.get(Drill, drill_id)
        if row is None:
            row = Drill(id=drill_id)
            s.add(row)
        row.domain, row.host, row.point_id, row.throwaway = domain, host, point_id, throwaway
        row.state, row.checks, row.error, row.cleaned_up = RUNNING, [], None, False
        row.restore_seconds = row.boot_seconds = row.finished_at = None
        row.started_at = utcnow()
        s.flush()
        return _view(row)


def _guarded(drill: DrillView):  # an UPDATE of this attempt's row only
    return update(Drill).where(Drill.id == drill.id, Drill.started_at == drill.started_at)


def record(cat: Catalog, drill: DrillView, *, checks: list[dict[str, Any]],
           restore_seconds: float | None = None, boot_seconds: float | None = None) -> None:
    """Store the checks so far and the times measured so far."""
    values: dict[str, Any] = {"checks": list(checks)}
    if restore_seconds is not None:
        values["restore_seconds"] = restore_seconds
    if boot_seconds is not None:
        values["boot_seconds"] = boot_seconds
    with cat.session() as s:
        s.execute(_guarded(drill).values(**values))


def finish(cat: Catalog, drill: DrillView, *, passed: bool, error: str | None = None) -> None:
    with cat.session() as s:
        s.execute(_guarded(drill).values(state=PASSED if passed else FAILED, error=error and error[:4000],
                                         finished_at=utcnow()))


def cleaned(cat: Catalog, drill: DrillView, ok: bool, error: str | None = None) -> None:
    """Record the outcome of the clean-up (``error`` is appended to the drill's error)."""
    with cat.session() as s:
        row = s.get(Drill, drill.id)
        if row is None or row.started_at != drill.started_at:
            return
        row.cleaned_up = ok
        if error:
            row.error = f"{row.error}; {error}" if row.error else error


def get(cat: Catalog, drill_id: str) -> DrillView:
    with cat.session() as s:
        row = s.get(Drill, drill_id)
        if row is None:
            raise NotFound(f"no drill {drill_id!r}")
        return _view(row)


def find(cat: Catalog, drill_id: str) -> DrillView | None:
    with cat.session() as s:
        row = s.get(Drill, drill_id)
        return _view(row) if row else None


def recent(cat: Catalog, *, domain: str | None = None, limit: int = 50) -> list[DrillView]:
    """The newest drills first."""
    with cat.session() as s:
        q = select(Drill).order_by(Drill.started_at.desc()).limit(limit)
        if domain:
            q = q.where(Drill.domain == domain)
        return [_view(r) for r in s.scalars(q)]


def points_in_use(cat: Catalog, domain: str) -> set[str]:
    """The restore points that drills of ``domain`` are restoring right now (their job
    is running with a live lease): a prune must not delete them meanwhile."""
    with cat.session() as s:
        q = (select(Drill.point_id).join(Job, Job.id == Drill.id)
             .where(Drill.domain == domain, Drill.state == RUNNING, Drill.point_id.is_not(None),
                    Job.state == "running", Job.lease_expires_at >= db_now()))
        return set(s.scalars(q))


def live_ids(cat: Catalog) -> set[str]:
    """Drills whose job is being run right now: running, with a lease not yet expired.
    Anything a drill left on a host that is not in this set is a leftover."""
    with cat.session() as s:
        q = (select(Drill.id).join(Job, Job.id == Drill.id)
             .where(Job.state == "running", Job.lease_expires_at >= db_now()))
        return set(s.scalars(q))


def abandon_dead(cat: Catalog, host: str, reason: str) -> list[str]:
    """Mark failed the ``running`` drills on ``host`` whose job no longer runs (their
    worker died, and the job was given up or is waiting for another attempt); returns
    their ids."""
    live = live_ids(cat)
    with cat.session() as s:
        rows = s.scalars(select(Drill).where(Drill.host == host, Drill.state == RUNNING)).all()
        dead = [r for r in rows if r.id not in live]
        for r in dead:
            r.state, r.finished_at = FAILED, utcnow()
            r.error = f"{r.error}; {reason}" if r.error else reason
        return [r.id for r in dead]


def mark_cleaned(cat: Catalog, drill_ids: list[str]) -> None:
    if not drill_ids:
        return
    with cat.session() as s:
        s.execute(update(Drill).where(Drill.id.in_(drill_ids)).values(cleaned_up=True))


def unclean(cat: Catalog, host: str) -> list[str]:
    """Finished drills on ``host`` whose clean-up did not complete."""
    with cat.session() as s:
        q = select(Drill.id).where(Drill.host == host, Drill.state != RUNNING, Drill.cleaned_up.is_(False))
        return list(s.scalars(q))


def by_throwaway(cat: Catalog, names: list[str]) -> dict[str, set[str]]:
    """Throwaway domain name -> ids of the drills that used it, for ``names``."""
    if not names:
        return {}
    out: dict[str, set[str]] = {}
    with cat.session() as s:
        for drill_id, name in s.execute(select(Drill.id, Drill.throwaway).where(Drill.throwaway.in_(names))):
            if name is not None:  # always: NULL is never IN (names)
                out.setdefault(name, set()).add(drill_id)
    return out


def existing(cat: Catalog, ids: list[str]) -> set[str]:
    """Which of ``ids`` are drills in this catalog."""
    if not ids:
        return set()
    with cat.session() as s:
        return set(s.scalars(select(Drill.id).where(Drill.id.in_(ids))))
