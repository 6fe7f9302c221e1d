"""Rows that only grow (audit log, events, alerts, idempotency keys) are deleted by age:
by a real worker's sweeper, on SQLite and on PostgreSQL, with the rows' times set in
the past as the catalog stores them."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from virtwarden.catalog.housekeeping import prune_rows
from virtwarden.catalog.models import Alert, ApiIdempotencyKey, AuditRecord, Event
from virtwarden.catalog.store import Catalog

from tests.harness import wait_for

NOW = datetime.now(UTC)


def _ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def _seed(cat: Catalog, ages: dict[str, tuple[float, ...]]) -> None:
    """One row of each kind per age, tagged with it (``d400``: written 400 days ago)."""
    with cat.session() as s:
        for days in ages["audit"]:
            s.add(AuditRecord(at=_ago(days), actor="test", action=f"d{days}", target=None, params={},
                              outcome="succeeded"))
        for days in ages["events"]:
            s.add(Event(host="local", domain=f"d{days}", kind="started", received_at=_ago(days)))
        for days in ages["alerts"]:
            s.add(Alert(fingerprint=f"d{days}", name="HostDown", status="firing", labels={}, starts_at=_ago(days),
                        received_at=_ago(days)))
        for days in ages["idempotency"]:
            s.add(ApiIdempotencyKey(key=f"d{days}", request_sha256="0" * 64, job_id="j", actor="api:test",
                                    created_at=_ago(days)))


def _left(cat: Catalog) -> dict[str, list[str]]:
    with cat.session() as s:
        return {"audit": sorted(s.scalars(select(AuditRecord.action))),
                "events": sorted(s.scalars(select(Event.domain))),
                "alerts": sorted(s.scalars(select(Alert.fingerprint))),
                "idempotency": sorted(s.scalars(select(ApiIdempotencyKey.key)))}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_workers_sweeper_deletes_rows_older_than_kept_and_keeps_younger_ones(vw, database, request):
    if database == "postgresql":
        vw.extra["database_url"] = request.getfixturevalue("pg_schema_url")
    # The defaults, except events kept forever and a prune at every sweep.
    vw.extra["catalog"] = {"events_days": None, "prune_seconds": 1}
    cat = vw.catalog()
    _seed(cat, {"audit": (400, 300), "events": (400, 1), "alerts": (91, 89), "idempotency": (8, 6)})
    vw.start_worker()
    expected = {"audit": ["d300"], "events": ["d1", "d400"], "alerts": ["d89"], "idempotency": ["d6"]}
    wait_for(lambda: _left(cat) == expected, 60, "the sweeper to prune old rows", poll=0.5)
    assert "deleted old catalog rows: 1 audit, 1 alerts, 1 idempotency" in vw.workers[0].log.read_text()
    cat.close()


def test_pruning_works_through_a_backlog_in_batches(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _seed(cat, {"audit": (400,) * 7 + (10,), "events": (), "alerts": (), "idempotency": ()})
    assert prune_rows(cat, {"audit": 365, "events": None}, batch=3) == {"audit": 7}
    assert _left(cat)["audit"] == ["d10"]
    assert prune_rows(cat, {"audit": 365}) == {"audit": 0}
    cat.close()
