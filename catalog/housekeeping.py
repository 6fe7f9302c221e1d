"""Rows that only grow, deleted once they are old enough: the audit log, hypervisor
events, Alertmanager alerts and the API's idempotency keys.

``prune_rows(cat, {"audit": 365, ...})`` deletes, per kind, the rows written more than
that many days ago by the database's clock (catalog/clock.py), in batches, each batch
its own short transaction, through the index on the row's time. ``None`` keeps a kind
forever. Every worker's sweeper and every scheduler tick calls it now and then
(worker/outbox.py); several processes doing so at once delete nothing twice.

What forgetting costs: an idempotency key older than its period sent again reaches the
same job all the same (the job's dedup key ``api:<key>`` is kept with the job), and an
alert occurrence pruned while Alertmanager still repeats it is recorded again as new,
but its action reaches the job it started the first time through the job's dedup key
``alert:<fingerprint>:<startsAt>``. Jobs, restore points and drills are not pruned here.
"""
from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from virtwarden.catalog.clock import db_later
from virtwarden.catalog.models import Alert, ApiIdempotencyKey, AuditRecord, Event
from virtwarden.catalog.store import Catalog

DAY = 86400
BATCH = 5000
# kind -> (table, the column that says when a row was written)
KINDS: dict[str, tuple[Any, Any]] = {
    "audit": (AuditRecord, AuditRecord.at),
    "events": (Event, Event.received_at),
    "alerts": (Alert, Alert.received_at),
    "idempotency": (ApiIdempotencyKey, ApiIdempotencyKey.created_at),
}


def prune_rows(cat: Catalog, keep_days: dict[str, int | None], batch: int = BATCH) -> dict[str, int]:
    """Delete the rows older than their kind's days; returns how many went, by kind."""
    removed: dict[str, int] = {}
    for kind, days in keep_days.items():
        if days is not None:
            removed[kind] = _prune(cat, kind, days, batch)
    return removed


def _prune(cat: Catalog, kind: str, days: int, batch: int) -> int:
    model, written = KINDS[kind]
    key = model.__mapper__.primary_key[0]
    oldest = select(key).where(written < db_later(-days * DAY)).limit(batch)
    total = 0
    while True:
        with cat.session() as s:
            # A DELETE's result is a CursorResult (with rowcount); Session.execute is typed as Result.
            gone = cast(CursorResult[Any], s.execute(delete(model).where(key.in_(oldest))
                                                      .execution_options(synchronize_session=False)))
            total += gone.rowcount
        if gone.rowcount < batch:
            return total
