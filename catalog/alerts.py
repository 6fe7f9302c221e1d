"""Alertmanager alerts as received: one row per occurrence, (fingerprint, startsAt).

Alertmanager delivers at least once and repeats a firing alert every repeat interval;
the unique (fingerprint, starts_at) pair turns every repeat into a no-op. A new
``startsAt`` with the same fingerprint is a new occurrence (the alert resolved and
fired again).
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from virtwarden.catalog.models import Alert, utcnow
from virtwarden.catalog.store import Catalog
from virtwarden.catalog.views import AlertView


def _view(row: Alert) -> AlertView:
    return AlertView(**{k: getattr(row, k) for k in AlertView.__dataclass_fields__})


def _find(s, fingerprint: str, starts_at: datetime) -> Alert | None:  # a Session
    return s.scalars(select(Alert).where(Alert.fingerprint == fingerprint,
                                         Alert.starts_at == starts_at)).first()


def record(cat: Catalog, *, fingerprint: str, name: str, status: str, labels: dict, host: str | None,
           action: str | None, starts_at: datetime) -> tuple[AlertView, bool]:
    """Insert the occurrence; the flag is False when it was there already (a repeat)."""
    row = Alert(fingerprint=fingerprint, name=name, status=status, labels=labels, host=host, action=action,
                starts_at=starts_at, received_at=utcnow())
    try:
        with cat.session() as s:
            s.add(row)
            s.flush()
            return _view(row), True
    except IntegrityError:
        with cat.session() as s:
            existing = _find(s, fingerprint, starts_at)
            assert existing is not None
            return _view(existing), False


def set_job(cat: Catalog, alert_id: int, job_id: str | None) -> None:
    with cat.session() as s:
        s.execute(update(Alert).where(Alert.id == alert_id).values(job_id=job_id))


def set_outcome(cat: Catalog, alert_id: int, outcome: str, detail: str | None) -> None:
    """What the latest delivery of the occurrence did (a repeat that did nothing is not
    recorded over it)."""
    with cat.session() as s:
        s.execute(update(Alert).where(Alert.id == alert_id).values(outcome=outcome, detail=detail))


def resolve(cat: Catalog, *, fingerprint: str, name: str, labels: dict, host: str | None, starts_at: datetime,
            resolved_at: datetime) -> tuple[AlertView, str]:
    """Mark the occurrence resolved. Returns the row and what happened: ``resolved``,
    ``repeated`` (it was resolved already) or ``new`` (it never arrived firing: recorded
    resolved)."""
    with cat.session() as s:
        row = _find(s, fingerprint, starts_at)
        if row is not None:
            if row.status == "resolved":
                return _view(row), "repeated"
            row.status, row.resolved_at = "resolved", resolved_at
            s.flush()
            return _view(row), "resolved"
    view, created = record(cat, fingerprint=fingerprint, name=name, status="resolved", labels=labels, host=host,
                           action=None, starts_at=starts_at)
    if not created:  # it arrived firing meanwhile
        return resolve(cat, fingerprint=fingerprint, name=name, labels=labels, host=host, starts_at=starts_at,
                       resolved_at=resolved_at)
    with cat.session() as s:
        s.execute(update(Alert).where(Alert.id == view.id).values(resolved_at=resolved_at))
    return AlertView(**{**view.__dict__, "resolved_at": resolved_at}), "new"


def recent(cat: Catalog, *, limit: int = 100, host: str | None = None) -> list[AlertView]:
    """The last ``limit`` occurrences received (of ``host``), oldest first."""
    query = select(Alert).order_by(Alert.id.desc()).limit(limit)
    if host is not None:
        query = query.where(Alert.host == host)
    with cat.session() as s:
        return [_view(r) for r in reversed(s.scalars(query).all())]
