"""Rows that only grow (audit log, events, alerts, idempotency keys, and the history of
jobs, slots, restore points and drills) are deleted by age: by a real worker's sweeper,
on SQLite and on PostgreSQL, with the rows' times set in the past as the catalog stores
them; history only where nothing still needs it."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from virtwarden.catalog.housekeeping import prune_rows
from virtwarden.catalog.models import (
    Alert,
    ApiIdempotencyKey,
    Artifact,
    AuditRecord,
    Drill,
    Event,
    Job,
    Overlay,
    RestorePoint,
    ScheduleSlot,
    Snapshot,
)
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
    with cat.session() as s:  # and history: one job past the default 90 days, one within
        for days in (91, 89):
            s.add(Job(id=f"d{days}", kind="backup", state="succeeded", params={}, created_at=_ago(days),
                      finished_at=_ago(days)))
    vw.start_worker()
    expected = {"audit": ["d300"], "events": ["d1", "d400"], "alerts": ["d89"], "idempotency": ["d6"], "jobs": ["d89"]}

    def left() -> dict[str, list[str]]:
        with cat.session() as s:
            return {**_left(cat), "jobs": sorted(s.scalars(select(Job.id)))}

    wait_for(lambda: left() == expected, 60, "the sweeper to prune old rows", poll=0.5)
    said = "deleted old catalog rows: 1 audit, 1 alerts, 1 idempotency, 1 jobs"  # logged after the commit
    wait_for(lambda: said in vw.workers[0].log.read_text(), 30, "the sweeper's log line")
    cat.close()


def test_pruning_works_through_a_backlog_in_batches(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _seed(cat, {"audit": (400,) * 7 + (10,), "events": (), "alerts": (), "idempotency": ()})
    assert prune_rows(cat, {"audit": 365, "events": None}, batch=3) == {"audit": 7}
    assert _left(cat)["audit"] == ["d10"]
    assert prune_rows(cat, {"audit": 365}) == {"audit": 0}
    cat.close()


# --- history: jobs, slots, points, drills ---------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def history(request, tmp_path):
    if request.param == "sqlite":
        cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    else:
        cat = Catalog(request.getfixturevalue("pg_schema_url"))
    yield cat
    cat.close()


def _seed_history(cat: Catalog) -> None:
    """Rows of each history kind, named for what they are; the old ones are 100 days old."""
    with cat.session() as s:
        def job(name: str, state: str, created: float, finished: float | None) -> None:
            s.add(Job(id=name, kind="backup", state=state, domain="web01", host="local", params={},
                      created_at=_ago(created), finished_at=None if finished is None else _ago(finished)))

        job("old-succeeded", "succeeded", 100, 100)
        job("old-failed", "failed", 100, 99)
        job("old-running", "running", 100, None)  # a job still running is never history
        job("old-queued", "queued", 100, None)
        job("old-but-finished-lately", "succeeded", 100, 3)
        job("young", "succeeded", 2, 2)
        job("old-with-open-overlay", "failed", 100, 100)
        job("old-with-committed-overlay", "failed", 100, 100)
        s.add(Overlay(job_id="old-with-open-overlay", domain="web01", target="vda", overlay_path="/o1",
                      base_path="/b", state="created", created_at=_ago(100)))
        s.add(Overlay(job_id="old-with-committed-overlay", domain="web01", target="vda", overlay_path="/o2",
                      base_path="/b", state="committed", created_at=_ago(100)))
        for name, days in (("old", 100), ("young", 2)):
            s.add(ScheduleSlot(policy="p", job="backup", domain=f"{name}-slot", slot_at=_ago(days),
                               window_end=_ago(days - 0.1), state="started", created_at=_ago(days)))

        def point(name: str, status: str, days: float, parent: str | None = None) -> None:
            s.add(RestorePoint(id=name, domain="web01", domain_uuid="u", host="local", storage="nfs",
                               strategy="bitmap", chain_id="c", parent_id=parent, seq=0, level="full",
                               status=status, manifest_key=f"{name}/manifest.json", created_at=_ago(days),
                               artifacts=[Artifact(target="vda", key=f"{name}/vda.qcow2", size_bytes=1,
                                                   sha256="0" * 64, virtual_size=1)]))

        point("old-deleted", "deleted", 100)
        point("old-failed", "failed", 100)
        point("young-deleted", "deleted", 2)
        point("old-complete", "complete", 100)  # retention and prune decide about these
        point("old-damaged", "damaged", 100)
        point("old-deleted-parent-of-a-complete-one", "deleted", 100)
        point("child", "complete", 100, parent="old-deleted-parent-of-a-complete-one")
        point("old-deleted-parent-of-a-deleted-one", "deleted", 100)
        point("deleted-child", "deleted", 100, parent="old-deleted-parent-of-a-deleted-one")

        def drill(name: str, domain: str, state: str, days: float, cleaned_up: bool = True) -> None:
            s.add(Drill(id=name, domain=domain, host="local", state=state, started_at=_ago(days),
                        cleaned_up=cleaned_up))

        drill("web01-older", "web01", "passed", 400)
        drill("web01-old-left-behind", "web01", "failed", 390, cleaned_up=False)  # leftovers to clean yet
        drill("web01-newest", "web01", "failed", 380)
        drill("db01-only-and-old", "db01", "passed", 500)  # the "last drill" of db01, however old
        drill("db01-running", "db01", "running", 600)

        def snapshot(name: str, state: str, created: float, deleted: float | None) -> None:
            s.add(Snapshot(domain="web01", domain_uuid="u", host="local", name=name, policy="p", kind="internal",
                           state=state, created_at=_ago(created),
                           deleted_at=None if deleted is None else _ago(deleted)))

        snapshot("old-deleted", "deleted", 200, 100)
        snapshot("old-missing", "missing", 200, 100)
        snapshot("old-deleted-lately", "deleted", 200, 3)
        snapshot("old-present", "present", 200, None)  # rotation decides about live snapshots
        snapshot("old-creating", "creating", 200, None)
        s.add(Overlay(job_id="young", domain="web01", target="vda", overlay_path="/o3", base_path="/b",
                      state="abandoned", created_at=_ago(2)))
        s.add(Overlay(job_id="old-running", domain="web01", target="vda", overlay_path="/o4", base_path="/b",
                      state="tracking", created_at=_ago(100)))  # in a live chain: recovery needs it


def _history_left(cat: Catalog) -> dict[str, list[str]]:
    with cat.session() as s:
        return {"jobs": sorted(s.scalars(select(Job.id))),
                "slots": sorted(s.scalars(select(ScheduleSlot.domain))),
                "points": sorted(s.scalars(select(RestorePoint.id))),
                "artifacts": sorted(k.split("/")[0] for k in s.scalars(select(Artifact.key))),
                "drills": sorted(s.scalars(select(Drill.id))),
                "snapshots": sorted(s.scalars(select(Snapshot.name))),
                "overlays": sorted(s.scalars(select(Overlay.overlay_path)))}


KEEP = {"jobs": 90, "slots": 90, "points": 90, "drills": 365, "snapshots": 90, "overlays": 90}


def test_history_is_pruned_only_where_nothing_needs_it_any_more(history):
    _seed_history(history)
    removed = prune_rows(history, KEEP, batch=2)
    left = _history_left(history)
    assert left["jobs"] == ["old-but-finished-lately", "old-queued", "old-running", "old-with-open-overlay", "young"]
    assert left["slots"] == ["young-slot"]
    assert left["points"] == ["child", "old-complete", "old-damaged", "old-deleted-parent-of-a-complete-one",
                              "young-deleted"]
    assert left["artifacts"] == left["points"]  # a pruned point's artifact rows went with it, and no other
    assert left["drills"] == ["db01-only-and-old", "db01-running", "web01-newest", "web01-old-left-behind"]
    assert left["snapshots"] == ["old-creating", "old-deleted-lately", "old-present"]
    assert left["overlays"] == ["/o1", "/o3", "/o4"]  # the committed /o2 went; open and young ones stay
    assert removed == {"jobs": 3, "slots": 1, "points": 4, "drills": 1, "snapshots": 2, "overlays": 1}
    assert prune_rows(history, KEEP) == dict.fromkeys(KEEP, 0)


def test_history_kept_forever_when_configured_so(history):
    _seed_history(history)
    before = _history_left(history)
    assert prune_rows(history, dict.fromkeys(KEEP)) == {}
    assert _history_left(history) == before
