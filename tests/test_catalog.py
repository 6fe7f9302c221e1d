"""The catalog on SQLite and PostgreSQL: schema through Alembic, job leases that only one
process can win, and restore points that are usable only once complete."""
from __future__ import annotations

import sys
import threading
import time
import uuid

import pytest
from virtwarden.catalog import jobs, points
from virtwarden.catalog.store import Catalog

from virtwarden.errors import ConfigError, DatabaseUnavailable, JobNotFound, RestorePointNotFound


@pytest.fixture(params=["sqlite", "postgresql"])
def cat(request, tmp_path):
    if request.param == "sqlite":
        c = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        yield c
        c.close()
        return
    c = Catalog(request.getfixturevalue("pg_schema_url"))
    yield c
    c.close()


def _job(cat, domain="web01", kind="backup"):
    return jobs.create(cat, kind=kind, domain=domain, host="kvm01", params={"domain": domain})


def test_schema_is_created_once_and_reopening_is_a_no_op(cat):
    again = Catalog(cat.url)
    assert jobs.recent(again) == []
    again.close()


def test_the_newest_revision_read_from_file_names_is_alembics_head(cat, tmp_path):
    """Opening a current catalog compares its revision with the migration files' names
    and never imports Alembic; that shortcut holds only while Alembic agrees. A catalog
    one revision behind is still upgraded."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory
    from virtwarden.catalog.store import MIGRATIONS, newest_revision

    alembic_cfg = AlembicConfig()
    alembic_cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(alembic_cfg).get_current_head()
    assert newest_revision() == head
    with cat.engine.begin() as conn:  # as if made by the release before the newest migration
        alembic_cfg.attributes["connection"] = conn
        command.downgrade(alembic_cfg, "-1")
    with cat.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() != head
    Catalog(cat.url).close()
    with cat.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head


def test_only_one_of_many_concurrent_claims_wins(cat):
    job = _job(cat)
    results = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(jobs.claim(cat, job.id, f"w{i}", 30, lock_domain=True).ok)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert jobs.get(cat, job.id).attempts == 1


def test_domain_lock_serialises_disk_changing_jobs(cat):
    a, b, other = _job(cat), _job(cat), _job(cat, domain="db01")
    first = jobs.claim(cat, a.id, "w1", 30, lock_domain=True)
    assert first.ok
    busy = jobs.claim(cat, b.id, "w2", 30, lock_domain=True)
    assert (busy.ok, busy.why) == (False, "domain-busy")
    assert jobs.get(cat, b.id).state == jobs.QUEUED  # the failed claim changed nothing
    assert jobs.claim(cat, other.id, "w3", 30, lock_domain=True).ok
    assert jobs.finish(cat, first.fence, ok=True, result={"x": 1})
    assert jobs.claim(cat, b.id, "w2", 30, lock_domain=True).ok


def test_expired_lease_is_reaped_then_taken_over_and_the_old_owner_is_told(cat):
    job = _job(cat)
    # A lease of 1 s: "still fresh" must be seen within it, on a loaded machine too.
    dead = jobs.claim(cat, job.id, "dead", 1.0, lock_domain=True).fence
    assert jobs.reap(cat) == []  # lease still fresh
    time.sleep(1.1)
    requeued = jobs.reap(cat)
    assert [j.id for j in requeued] == [job.id] and requeued[0].state == jobs.QUEUED
    new = jobs.claim(cat, job.id, "new", 30, lock_domain=True)
    assert new.attempt == 2 and new.fence.token == dead.token + 1
    assert not jobs.heartbeat(cat, dead)  # the old attempt lost it
    assert not jobs.finish(cat, dead, ok=True)
    assert jobs.heartbeat(cat, new.fence, progress=0.5, text="copying")
    assert jobs.get(cat, job.id).progress_text == "copying"


def test_reaper_gives_up_after_max_attempts(cat):
    job = jobs.create(cat, kind="backup", domain="d", host="h", params={}, max_attempts=1)
    assert jobs.claim(cat, job.id, "dead", 0.1, lock_domain=True).ok
    time.sleep(0.2)
    assert jobs.reap(cat) == []
    failed = jobs.get(cat, job.id)
    assert failed.state == jobs.FAILED and "giving up" in (failed.error or "")
    assert not jobs.claim(cat, job.id, "late", 30, lock_domain=True).ok


def test_finished_job_is_never_run_again(cat):
    job = _job(cat)
    taken = jobs.claim(cat, job.id, "w", 30, lock_domain=False)
    jobs.finish(cat, taken.fence, ok=False, error="boom")
    assert jobs.claim(cat, job.id, "w2", 30, lock_domain=False).why == "finished"
    with pytest.raises(JobNotFound):
        jobs.get(cat, "nope")


def test_dedup_key_returns_the_existing_job(cat):
    a = jobs.create(cat, kind="backup", domain="d", host="h", params={}, dedup_key="slot-1")
    b = jobs.create(cat, kind="backup", domain="d", host="h", params={}, dedup_key="slot-1")
    assert a.id == b.id


def test_jobs_created_in_a_batch_are_what_the_catalog_then_reads(cat):
    """create_many builds its views from the values it inserted and the times the INSERT
    returned (nothing is read back): they must be what a read of the rows gives."""
    first = jobs.create(cat, kind="backup", domain="d0", host="h", params={}, dedup_key="slot-0")
    values = [jobs.new_values(kind="backup", domain=f"d{i}", host="h", max_attempts=2, requested_by="scheduler",
                              params={"domain": f"d{i}", "retention": {"daily": 7}, "policy": None},
                              dedup_key=f"slot-{i % 3}") for i in range(5)]
    made = jobs.create_many(cat, values, resend_after=30)
    assert [new for _, new in made] == [False, True, True, False, False]  # slot-0 known, slot-1/2 repeated
    assert made[0][0] == first and made[3][0] == made[0][0] and made[4][0] == made[1][0]
    for view, _ in made:
        assert view == jobs.get(cat, view.id)
        assert view.created_at.tzinfo is not None


def _point(cat, **over):
    fields = dict(id=str(uuid.uuid4()), domain="web01", domain_uuid="u1", host="h", storage="nfs",
                  strategy="bitmap", chain_id="c1", parent_id=None, seq=0, level="full", reason="first",
                  checkpoint="virtwarden-1", manifest_key="k/manifest.json", job_id="j")
    fields.update(over)
    return points.begin(cat, **fields)


def test_points_are_usable_only_when_complete_and_chains_need_every_link(cat):
    full = _point(cat)
    assert points.chain_head(cat, "u1", "nfs", "bitmap") is None
    art = [points.ArtifactView("vda", "k/vda.qcow2", 10, "ab" * 32, 100)]
    points.complete(cat, full.id, art, consistency="crash")
    inc = _point(cat, parent_id=full.id, seq=1, level="incremental", checkpoint="virtwarden-2")
    assert points.chain_head(cat, "u1", "nfs", "bitmap").id == full.id
    with pytest.raises(RestorePointNotFound, match="writing, not complete"):
        points.chain_to(cat, inc.id)
    points.complete(cat, inc.id, art, consistency="crash")
    assert [p.id for p in points.chain_to(cat, inc.id)] == [full.id, inc.id]
    broken = _point(cat, parent_id=inc.id, seq=2, level="incremental")
    points.fail(cat, broken.id, "worker lost")
    assert points.get(cat, broken.id).status == points.FAILED
    assert [p.checkpoint for p in points.heads(cat, "u1")] == ["virtwarden-2"]
    assert points.get(cat, inc.id).size_bytes == 10


def test_a_damaged_point_takes_every_point_built_on_it_out_of_the_chain(cat):
    art = [points.ArtifactView("vda", "k/vda.qcow2", 10, "ab" * 32, 100)]
    full = _point(cat)
    points.complete(cat, full.id, art, consistency="crash")
    made = [full]
    for seq in (1, 2):
        inc = _point(cat, parent_id=made[-1].id, seq=seq, level="incremental", checkpoint=f"virtwarden-{seq + 1}")
        points.complete(cat, inc.id, art, consistency="crash")
        made.append(inc)
    writing = _point(cat, parent_id=made[-1].id, seq=3, level="incremental", checkpoint="virtwarden-4")

    assert points.mark_damaged(cat, made[1].id, "k/vda.qcow2: checksum mismatch") == [made[1].id, made[2].id]
    assert points.mark_damaged(cat, made[1].id, "again") == []  # already damaged: nothing changes

    assert [points.get(cat, p.id).status for p in made] == ["complete", "damaged", "damaged"]
    assert points.get(cat, made[2].id).damage == f"built on damaged restore point {made[1].id}: " \
                                                "k/vda.qcow2: checksum mismatch"
    assert points.chain_head(cat, "u1", "nfs", "bitmap").id == full.id  # never a parent
    assert points.damaged_since(cat, "u1", "nfs", "bitmap", points.chain_head(cat, "u1", "nfs", "bitmap")).id \
        == made[2].id
    with pytest.raises(RestorePointNotFound, match="damaged, not complete.*checksum mismatch"):
        points.chain_to(cat, made[2].id)
    from virtwarden.errors import JobFailed

    with pytest.raises(JobFailed, match=f"built on, {made[2].id}, is damaged"):  # written while it was found
        points.complete(cat, writing.id, art, consistency="crash")
    assert points.get(cat, writing.id).status == points.WRITING  # its backup fails it and removes its data


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(DatabaseUnavailable, match="unreachable"):
        Catalog("postgresql+psycopg2://nobody:secret@127.0.0.1:1/x")


@pytest.mark.parametrize("url", ["postgresql+psycopg2://nobody:secret@127.0.0.1:1/x",
                                 "postgresql://nobody:secret@127.0.0.1:1/x"])
def test_a_postgresql_catalog_without_its_driver_installed_names_the_extra(monkeypatch, url):
    for driver in ("psycopg2", "psycopg"):  # `import psycopg2` (and psycopg) now fail as if absent
        monkeypatch.setitem(sys.modules, driver, None)
    with pytest.raises(ConfigError) as raised:
        Catalog(url)
    message = str(raised.value)
    assert " is not installed" in message and "pip install 'virtwarden[postgres]'" in message
    assert "secret" not in message


def test_processes_opening_a_new_catalog_at_once_all_succeed(tmp_path):
    """The first start of a fleet opens one new catalog from several processes at once."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = f"from catalog.store import Catalog; Catalog({url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    assert errors == []
    assert jobs.recent(Catalog(url)) == []


def test_finished_jobs_are_counted_once_each_in_their_bucket_even_when_they_end_together(cat):
    """``job_totals`` (the metrics' histogram and byte counter) counts a job in the
    transaction that records its end: jobs ending at once are all counted, an attempt that
    lost its job counts nothing, a requeue is no end, a reaped last attempt and a job that
    could not be sent are failures."""
    from sqlalchemy import select
    from virtwarden.catalog.models import JobTotal

    fences = []
    for i in range(8):
        job = _job(cat, domain=f"d{i}")
        fences.append(jobs.claim(cat, job.id, f"w{i}", 30, lock_domain=True).fence)
    barrier = threading.Barrier(8)

    def finish(fence) -> None:
        barrier.wait()
        assert jobs.finish(cat, fence, ok=True, result={"size_bytes": 100})

    threads = [threading.Thread(target=finish, args=(f,)) for f in fences]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not jobs.finish(cat, fences[0], ok=False, error="a stale attempt")  # already ended: not counted

    again = _job(cat, domain="r")
    first = jobs.claim(cat, again.id, "w", 30, lock_domain=True).fence
    assert jobs.requeue(cat, first, "broker away", delay=0, resend_after=60)  # not an end
    assert jobs.finish(cat, jobs.claim(cat, again.id, "w", 30, lock_domain=True).fence, ok=False, error="boom")
    lost = jobs.create(cat, kind="restore", domain="x", host="h", params={}, max_attempts=1)
    assert jobs.claim(cat, lost.id, "dead", 0.1, lock_domain=True).ok
    time.sleep(0.2)
    jobs.reap(cat)
    unsent = _job(cat, domain="u")
    jobs.fail_queued(cat, unsent.id, "the broker refused it")

    with cat.session() as s:
        rows = {(r.kind, r.outcome, r.le): (r.jobs, r.bytes) for r in s.scalars(select(JobTotal))}
    assert rows == {("backup", "succeeded", "10"): (8, 800), ("backup", "failed", "10"): (2, 0),
                    ("restore", "failed", "10"): (1, 0)}
