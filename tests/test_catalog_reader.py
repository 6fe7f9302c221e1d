"""catalog.reader, the CLI's listings without SQLAlchemy, answers exactly what the catalog
modules answer, on SQLite and PostgreSQL, and answers nothing from a catalog it cannot
trust as it is (absent, another schema revision)."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from virtwarden.catalog import alerts, drills, jobs, points, reader, services, slots, snapshots
from virtwarden.catalog.store import Catalog

from tests.test_catalog import _point
from virtwarden.errors import ConfigError, DatabaseUnavailable, JobNotFound

REPO = Path(__file__).resolve().parent.parent


def _fill(cat: Catalog) -> None:
    """Jobs in every state with params, results, errors and progress; points complete,
    failed and damaged with artifacts on two disks; alerts of two hosts."""
    made = []
    for i, domain in enumerate(["web01", "db01", "web01", "web01"]):
        made.append(jobs.create(cat, kind="backup", domain=domain, host="kvm01",
                                params={"domain": domain, "n": i, "nested": {"full": i % 2 == 0}}))
    ok = jobs.claim(cat, made[0].id, "kvm01:1:1", 60, lock_domain=False)
    assert ok.ok and ok.fence
    jobs.heartbeat(cat, ok.fence, progress=0.5, text="half way")
    jobs.finish(cat, ok.fence, ok=True, result={"point_id": "p", "size_bytes": 12, "disks": ["vda", "vdb"]})
    bad = jobs.claim(cat, made[1].id, "kvm01:1:2", 60, lock_domain=False)
    assert bad.ok and bad.fence
    jobs.finish(cat, bad.fence, ok=False, error="storage 'nfs' is full: no space left on device")
    running = jobs.claim(cat, made[2].id, "kvm01:1:3", 60, lock_domain=False)
    assert running.ok and running.fence
    jobs.heartbeat(cat, running.fence, progress=0.25, text="vda: 1 GiB of 4 GiB")

    full = _point(cat)
    points.complete(cat, full.id, [points.ArtifactView("vdb", "k/vdb.qcow2", 20, "cd" * 32, 200),
                                   points.ArtifactView("vda", "k/vda.qcow2", 10, "ab" * 32, 100)],
                    consistency="quiesced", manifest_sha256="ef" * 32)
    inc = _point(cat, parent_id=full.id, seq=1, level="incremental", checkpoint="virtwarden-2")
    points.complete(cat, inc.id, [points.ArtifactView("vda", "k/vda.1.qcow2", 5, "01" * 32, 100)],
                    consistency="crash")
    points.record_verified(cat, [full.id])
    points.mark_damaged(cat, inc.id, "vda: 3 chunks do not match their ids")
    failed = _point(cat, chain_id="c2", checkpoint="virtwarden-3")
    points.fail(cat, failed.id, "the worker was killed")
    _point(cat, domain="db01", domain_uuid="u2", chain_id="c3")

    start = datetime(2026, 12, 7, 3, 0, 0, 123456, tzinfo=UTC)
    for i, host in enumerate(["kvm01", "kvm02", "kvm01", None]):
        row, _ = alerts.record(cat, fingerprint=f"f{i}", name="HostDown", status="firing",
                               labels={"alertname": "HostDown", "instance": host or "?", "i": i}, host=host,
                               action="evacuate" if host else None, starts_at=start + timedelta(minutes=i))
        if i == 1:
            alerts.set_outcome(cat, row.id, "refused", "host kvm02 is in no policy")

    services.Presence(cat, "worker", ["kvm01", "kvm02"]).beat()
    services.Presence(cat, "listener", ["kvm01"], backlog=lambda: (3, 0.25)).beat()
    for i, name in enumerate(["nightly-1", "nightly-2", "gone"]):
        snap = snapshots.begin(cat, domain="web01", domain_uuid="u1", host="kvm01", name=name, policy="nightly",
                               kind="external" if i else "internal", job_id=made[0].id)
        if i:
            snapshots.taken(cat, snap.id, "quiesced")
        if name == "gone":
            snapshots.deleted(cat, snap.id)
    for i, domain in enumerate(["web01", "db01"]):
        drill = drills.begin(cat, drill_id=made[i].id, domain=domain, host="kvm01", point_id=full.id,
                             throwaway=f"virtwarden-drill-{i}")
        drills.record(cat, drill, checks=[{"name": "boots", "ok": True, "detail": "running"},
                                          {"name": "agent", "ok": i == 0, "detail": "answered"}],
                      restore_seconds=2.5, boot_seconds=0.4 + i)
        drills.finish(cat, drill, passed=i == 0, error=None if i == 0 else "check agent failed")
        if i == 0:
            drills.cleaned(cat, drill, True)
    new = [slots.NewSlot("nightly", "backup", d, start - timedelta(hours=h), start - timedelta(hours=h - 1))
           for h in (1, 30) for d in ("web01", "db01")]
    slots.claim_many(cat, new, start)
    for row in slots.recent(cat, since=start - timedelta(days=3)):
        if row.domain == "db01":
            slots.move(cat, row.id, from_state="deferred", to_state="skipped", reason="missed: no scheduler",
                       cause="missed")


def test_the_reader_answers_what_the_catalog_answers(cat):
    _fill(cat)
    for domain in (None, "web01", "db01", "nobody"):
        for limit in (50, 2):
            assert reader.recent_jobs(cat.url, limit=limit, domain=domain) == \
                jobs.recent(cat, limit=limit, domain=domain)
    for j in jobs.recent(cat):
        assert reader.job(cat.url, j.id) == jobs.get(cat, j.id)
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        reader.job(cat.url, "nope")
    for domain in ("web01", "db01", "nobody"):
        assert reader.domain_points(cat.url, domain) == points.for_domain(cat, domain)
    for host in (None, "kvm01", "kvm02"):
        for limit in (100, 1):
            assert reader.recent_alerts(cat.url, limit=limit, host=host) == alerts.recent(cat, limit=limit, host=host)
    assert reader.services(cat.url) == services.listed(cat)
    for include_deleted in (False, True):
        assert reader.domain_snapshots(cat.url, "web01", include_deleted=include_deleted) == \
            snapshots.for_domain(cat, "web01", include_deleted=include_deleted)
    for domain in (None, "web01", "nobody"):
        assert reader.recent_drills(cat.url, domain=domain) == drills.recent(cat, domain=domain)
    since = datetime(2026, 12, 7, 3, 0, 0, 123456, tzinfo=UTC) - timedelta(hours=2)
    for when in (since, since - timedelta(days=3), since + timedelta(hours=1, microseconds=1)):
        for state, domain in ((None, None), ("skipped", None), (None, "web01"), ("deferred", "web01")):
            assert reader.recent_slots(cat.url, since=when, state=state, domain=domain) == \
                slots.recent(cat, since=when, state=state, domain=domain)
    # What was compared holds what the listings show: not two empty answers.
    listed = reader.recent_jobs(cat.url)
    assert [j.state for j in listed].count("running") == 1 and listed[-1].params["nested"] == {"full": True}
    assert {j.error for j in listed} >= {"storage 'nfs' is full: no space left on device"}
    web = reader.domain_points(cat.url, "web01")
    assert [p.status for p in web] == ["complete", "damaged", "failed"]
    assert [a.target for a in web[0].artifacts] == ["vda", "vdb"] and web[0].verified_at is not None
    assert all(p.created_at.tzinfo is UTC for p in web)
    assert reader.recent_alerts(cat.url, host="kvm02")[0].outcome == "refused"
    assert sorted(s.kind for s in reader.services(cat.url)) == ["listener", "worker"]
    assert [s.state for s in reader.domain_snapshots(cat.url, "web01", include_deleted=True)] == \
        ["creating", "present", "deleted"]
    tried = reader.recent_drills(cat.url)
    assert {d.cleaned_up for d in tried} == {True, False} and tried[0].checks[0]["name"] == "boots"
    assert {type(d.cleaned_up) for d in tried} == {bool}  # 1 == True: equality alone would not tell
    assert len(reader.recent_slots(cat.url, since=since)) == 2
    assert len(reader.recent_slots(cat.url, since=since - timedelta(days=3), state="skipped")) == 2


def test_a_catalog_not_yet_created_is_created_by_the_full_catalog(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert reader.recent_jobs(url) == []
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600  # created as the full catalog creates it
    assert reader.domain_points(url, "web01") == [] and reader.recent_alerts(url) == []


def test_a_schema_of_another_revision_is_not_read_by_the_reader(cat):
    """A catalog at a revision this code does not know (a newer release wrote it) is left
    to the full catalog, which refuses it, instead of being read as if it were current."""
    _fill(cat)
    with cat.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff'")
    with pytest.raises(ConfigError, match="at schema revision ffff, which this virtwarden does not know"):
        reader.recent_jobs(cat.url)


def test_an_unreachable_postgresql_catalog_is_the_same_clear_error_and_is_waited_for_once(monkeypatch):
    """Said by the reader, with the password masked, instead of being tried again by the
    full catalog (a host that drops packets would make the command wait twice)."""
    import virtwarden.catalog.store as store

    monkeypatch.setattr(store, "Catalog", lambda *a, **k: pytest.fail("the full catalog was tried as well"))
    with pytest.raises(DatabaseUnavailable, match="unreachable") as caught:
        reader.recent_jobs("postgresql+psycopg2://nobody:secret@127.0.0.1:1/x")
    assert "secret" not in str(caught.value)


def test_reading_changes_nothing_and_leaves_the_catalog_files_private(tmp_path):
    path = tmp_path / "catalog.db"
    c = Catalog(f"sqlite:///{path}")
    _fill(c)
    c.close()
    before = path.read_bytes()
    os.umask(0o022)  # what a login shell has: new files would be 0644
    for f in tmp_path.glob("catalog.db-*"):
        f.unlink()
    assert len(reader.recent_jobs(f"sqlite:///{path}")) == 4
    assert path.read_bytes() == before
    assert {f.name: f.stat().st_mode & 0o777 for f in tmp_path.glob("catalog.db*")} == \
        {f.name: 0o600 for f in tmp_path.glob("catalog.db*")}


def test_listing_commands_do_not_import_sqlalchemy(tmp_path):
    """The catalog's listings (``virtwarden jobs``, ``job``, ``backups``, ``alerts``,
    ``services``, ``snapshots``, ``drills``, ``schedule slots``) answer from an existing catalog
    without importing SQLAlchemy (0.2 s of their start-up; bench/cli_startup.py measures)."""
    config = tmp_path / "virtwarden.yaml"
    config.write_text(f"data_dir: {tmp_path}/data\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTWARDEN_")}
    env["VIRTWARDEN_CONFIG"] = str(config)
    probe = ("import sys\nfrom virtwarden.cli.main import main\ncode = main(sys.argv[1:])\n"
             "print('SQLALCHEMY' if 'sqlalchemy' in sys.modules else 'NONE', code)")
    first = subprocess.run([sys.executable, "-c", probe, "jobs"], env=env, cwd=REPO, capture_output=True, text=True)
    assert first.stdout.split()[-2:] == ["SQLALCHEMY", "0"], first.stderr  # it created the catalog
    for command in (["jobs"], ["jobs", "--json"], ["backups", "web01"], ["alerts", "--json"], ["job", "nope"],
                    ["services"], ["snapshots", "web01"], ["drills", "--json"], ["schedule", "slots"]):
        done = subprocess.run([sys.executable, "-c", probe, *command], env=env, cwd=REPO, capture_output=True,
                              text=True)
        expected = ["NONE", "0"] if command[0] != "job" else ["NONE", "4"]  # not found: its own exit code
        assert done.stdout.split()[-2:] == expected, (command, done.stdout, done.stderr)
