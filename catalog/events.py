"""Hypervisor events and the domains they describe, as the listener records them.

Every event is one row of ``events``; recording it also brings the domain's row in
``domains`` up to date (name, host, state, last seen) in the same transaction, so the
next reconciliation compares libvirt with what the events said. Events that a
reconciliation pass made up for a missed moment carry a detail starting with
``reconciled``. A host's row in ``hosts`` says when the listener last reconciled it;
a host without one was never seen, and its first pass records a baseline only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from virtwarden.catalog.models import Domain, Event, Host, utcnow
from virtwarden.catalog.store import Catalog

RECONCILED = "reconciled"
UNDEFINED = "undefined"  # the state of a domain row whose domain is gone


@dataclass(frozen=True)
class EventView:
    id: int
    host: str
    domain: str | None
    domain_uuid: str | None
    kind: str
    detail: str | None
    received_at: datetime

    @property
    def reconciled(self) -> bool:
        """Made up by a reconciliation pass, not said by libvirt at the time."""
        return (self.detail or "").startswith(RECONCILED)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["received_at"] = self.received_at.isoformat()
        out["reconciled"] = self.reconciled
        return out


@dataclass(frozen=True)
class KnownDomain:
    """A domain as the catalog last knew it."""

    uuid: str
    name: str
    host: str | None
    state: str | None


def _event_view(row: Event) -> EventView:
    return EventView(row.id, row.host, row.domain, row.domain_uuid, row.kind, row.detail, row.received_at)


def _known(row: Domain) -> KnownDomain:
    return KnownDomain(row.uuid, row.name, row.host, row.state)


def record(cat: Catalog, *, host: str, domain: str, uuid: str, kind: str, detail: str | None,
           at: datetime | None = None, state: str | None = None, touch_domain: bool = True) -> EventView:
    """Store one event and, with ``touch_domain``, update the domain's row to say it is
    on ``host`` (``state`` None: the event says nothing about the state, e.g. a block job)."""
    arrival = Arrival(host, domain, uuid, kind, at or utcnow(), lambda _before: (detail, state, touch_domain))
    return record_many(cat, [arrival])[0]


@dataclass(frozen=True)
class Arrival:
    """An event to record with others (``record_many``). ``decide`` is given what the
    catalog knew of the domain just before this event (earlier events of the same batch
    included) and returns the detail to store, the domain's state after it (None: the
    event says nothing about it) and whether the event moves the domain's row."""

    host: str
    domain: str
    uuid: str
    kind: str
    at: datetime
    decide: Callable[[KnownDomain | None], tuple[str | None, str | None, bool]]


def record_many(cat: Catalog, arrivals: Sequence[Arrival]) -> list[EventView]:
    """``record`` for many events in one transaction, in order: each sees the domain's row
    as the events before it left it. All are stored, or none (a retry stores them again
    whole)."""
    with cat.session() as s:
        # The batch's domains read at once; each event changes its domain's row in memory
        # (what the next event of that domain sees); all is written in one flush.
        known = {d.uuid: d for d in s.scalars(select(Domain).where(Domain.uuid.in_({a.uuid for a in arrivals})))}
        rows = []
        for a in arrivals:
            found = known.get(a.uuid)
            detail, state, touch = a.decide(_known(found) if found is not None else None)
            rows.append(Event(host=a.host, domain=a.domain, domain_uuid=a.uuid, kind=a.kind,
                              detail=(detail or "")[:255] or None, received_at=a.at))
            if not touch:
                continue
            known[a.uuid] = _apply(s, found, KnownDomain(a.uuid, a.domain, a.host, state), a.at)
        s.add_all(rows)
        s.flush()  # the events' ids, in order
        return [_event_view(r) for r in rows]


def _upsert(s, seen: KnownDomain, at: datetime) -> Domain:  # s: a Session
    """The domain's row made or brought up to date."""
    return _apply(s, s.get(Domain, seen.uuid), seen, at)


def _apply(s, row: Domain | None, seen: KnownDomain, at: datetime) -> Domain:
    """``row`` (the domain's, as read; None: there is none yet) made or brought up to date."""
    if row is None:
        row = Domain(uuid=seen.uuid, name=seen.name, host=seen.host, state=seen.state, first_seen_at=at,
                     last_seen_at=at)
        s.add(row)
        return row
    row.name, row.host, row.last_seen_at = seen.name, seen.host, at
    if seen.state is not None:
        row.state = seen.state
    return row


def recent(cat: Catalog, *, domain: str | None = None, host: str | None = None, limit: int = 100) -> list[EventView]:
    """The newest events (oldest first among them), optionally of one domain or host."""
    query = select(Event).order_by(Event.id.desc()).limit(limit)
    if domain is not None:
        query = query.where(Event.domain == domain)
    if host is not None:
        query = query.where(Event.host == host)
    with cat.session() as s:
        return [_event_view(r) for r in reversed(s.scalars(query).all())]


def domain(cat: Catalog, uuid: str) -> KnownDomain | None:
    with cat.session() as s:
        row = s.get(Domain, uuid)
        return _known(row) if row is not None else None


def domains(cat: Catalog) -> dict[str, KnownDomain]:
    """Every domain the catalog knows, by UUID (gone ones too, in state ``undefined``)."""
    with cat.session() as s:
        return {r.uuid: _known(r) for r in s.scalars(select(Domain))}


def note_domains(cat: Catalog, seen: Iterable[KnownDomain], at: datetime | None = None) -> None:
    """Record domains as seen now, without events (a baseline, or a pass that found
    nothing new)."""
    at = at or utcnow()
    with cat.session() as s:
        for d in seen:
            _upsert(s, d, at)


def host_known(cat: Catalog, host: str) -> bool:
    """Whether the listener reconciled this host before (its domains are a baseline)."""
    with cat.session() as s:
        row = s.get(Host, host)
        return row is not None and row.last_seen_at is not None


def host_reconciled(cat: Catalog, host: str, uri: str, group: str, at: datetime | None = None) -> None:
    at = at or utcnow()
    with cat.session() as s:
        row = s.get(Host, host)
        if row is None:
            s.add(Host(name=host, uri=uri, group=group, last_seen_at=at))
        else:
            row.uri, row.group, row.last_seen_at = uri, group, at
