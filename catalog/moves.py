"""Live migrations and host states in the catalog.

Each domain an evacuation considers gets one ``migrations`` row: ``planned`` with its
target, ``running`` while libvirt moves it, then ``succeeded`` (with the downtime
libvirt measured) or ``failed`` with the reason; a domain that cannot move is
``skipped`` with the reason. A host's row in ``hosts`` keeps what was last learned
about it: up or down (and why), and its capacity.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from virtwarden.catalog.models import Host, Migration, utcnow
from virtwarden.catalog.store import Catalog

PLANNED, RUNNING, SUCCEEDED, FAILED, SKIPPED = "planned", "running", "succeeded", "failed", "skipped"
OPEN = (PLANNED, RUNNING)


@dataclass(frozen=True)
class MigrationView:
    id: int
    job_id: str | None
    domain: str
    domain_uuid: str | None
    from_host: str
    to_host: str | None
    outcome: str
    reason: str | None
    downtime_ms: int | None
    started_at: datetime
    finished_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("started_at", "finished_at"):
            out[k] = out[k].isoformat() if out[k] else None
        return out


def _view(row: Migration) -> MigrationView:
    return MigrationView(**{k: getattr(row, k) for k in MigrationView.__dataclass_fields__})


def add(cat: Catalog, *, job_id: str | None, domain: str, domain_uuid: str | None, from_host: str,
        to_host: str | None, outcome: str, reason: str | None = None) -> MigrationView:
    now = utcnow()
    row = Migration(job_id=job_id, domain=domain, domain_uuid=domain_uuid, from_host=from_host, to_host=to_host,
                    outcome=outcome, reason=reason, started_at=now,
                    finished_at=now if outcome not in OPEN else None)
    with cat.session() as s:
        s.add(row)
        s.flush()
        return _view(row)


def running(cat: Catalog, row_id: int) -> None:
    with cat.session() as s:
        s.execute(update(Migration).where(Migration.id == row_id)
                  .values(outcome=RUNNING, started_at=utcnow()))


def finish(cat: Catalog, row_id: int, outcome: str, *, reason: str | None = None,
           downtime_ms: int | None = None) -> None:
    with cat.session() as s:
        s.execute(update(Migration).where(Migration.id == row_id)
                  .values(outcome=outcome, reason=reason, downtime_ms=downtime_ms, finished_at=utcnow()))


def for_job(cat: Catalog, job_id: str) -> list[MigrationView]:
    with cat.session() as s:
        rows = s.scalars(select(Migration).where(Migration.job_id == job_id).order_by(Migration.id))
        return [_view(r) for r in rows]


def recent(cat: Catalog, *, domain: str | None = None, limit: int = 100) -> list[MigrationView]:
    query = select(Migration).order_by(Migration.id.desc()).limit(limit)
    if domain is not None:
        query = query.where(Migration.domain == domain)
    with cat.session() as s:
        return [_view(r) for r in reversed(s.scalars(query).all())]


def open_for_job(cat: Catalog, job_id: str) -> list[MigrationView]:
    """Rows an earlier attempt of the job left planned or running (its worker died)."""
    return [m for m in for_job(cat, job_id) if m.outcome in OPEN]


def moved_since(cat: Catalog, domain_uuid: str, since: datetime) -> bool:
    """Whether virtwarden migrated the domain after ``since``."""
    with cat.session() as s:
        found = s.scalars(select(Migration.id).where(Migration.domain_uuid == domain_uuid,
                                                     Migration.outcome == SUCCEEDED,
                                                     Migration.finished_at >= since).limit(1)).first()
        return found is not None


def note_host(cat: Catalog, name: str, *, uri: str, group: str, up: bool, error: str | None = None,
              capacity: dict | None = None) -> None:
    """Record what was just learned about a host. ``last_seen_at`` is left alone: it
    belongs to the listener (it says the host's domains were reconciled)."""
    with cat.session() as s:
        row = s.get(Host, name)
        if row is None:
            row = Host(name=name, uri=uri, group=group)
            s.add(row)
        row.uri, row.group = uri, group
        row.state = "up" if up else "down"
        row.last_error = None if up else error
        if up:
            row.capacity = capacity
