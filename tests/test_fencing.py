"""Only the attempt that holds a job's newest fencing token changes anything; leases and
chain order follow the database's clock; nothing queued is forgotten. On SQLite and
PostgreSQL, through the real catalog functions (no worker, no libvirt)."""
from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import select, update
from virtwarden.catalog import jobs, overlays, points
from virtwarden.catalog.clock import db_later, db_now
from virtwarden.catalog.models import Job

from virtwarden.errors import JobFailed, LeaseLost


def _point(cat, job_id, **over):
    fields = dict(id=str(uuid.uuid4()), domain="web01", domain_uuid="u1", host="h", storage="nfs",
                  strategy="bitmap", chain_id="c1", parent_id=None, seq=0, level="full", reason="first",
                  checkpoint="virtwarden-1", manifest_key="k/manifest.json", job_id=job_id)
    fields.update(over)
    return points.begin(cat, **fields)


def _expire(cat, job_id):
    """Make the job's lease run out now, by the database's clock."""
    with cat.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_later(-1)))


ART = [points.ArtifactView("vda", "k/vda.qcow2", 10, "ab" * 32, 100)]


def test_a_taken_over_attempt_can_change_nothing_in_the_catalog(cat):
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    stale = jobs.claim(cat, job.id, "paused-worker", 30, lock_domain=True)
    stale_view = cat.fenced(stale.fence)
    point = _point(stale_view, job.id)  # written while it still owned the job
    _expire(cat, job.id)
    assert [j.id for j in jobs.reap(cat)] == [job.id]
    successor = jobs.claim(cat, job.id, "successor", 30, lock_domain=True)
    assert successor.fence.token == stale.fence.token + 1
    assert points.fail(cat.fenced(successor.fence), point.id, "recovered by the successor")

    # The paused worker wakes up: completing its point, writing journal rows, failing
    # or finishing the job, renewing its lease: each is refused and changes nothing.
    with pytest.raises(LeaseLost):
        points.complete(stale_view, point.id, ART, consistency="crash")
    with pytest.raises(LeaseLost):
        overlays.record(stale_view, job_id=job.id, domain="web01", target="vda", overlay_path="/x.qcow2",
                        base_path="/b.qcow2")
    with pytest.raises(LeaseLost):
        stale_view.check_owner("abort the libvirt job")
    assert not jobs.heartbeat(cat, stale.fence)
    assert not jobs.finish(cat, stale.fence, ok=True, result={})
    assert points.get(cat, point.id).status == points.FAILED
    assert overlays.for_domain(cat, "web01") == []
    assert jobs.get(cat, job.id).state == jobs.RUNNING and jobs.get(cat, job.id).fence == successor.fence.token
    # Reads stay possible; the successor writes normally.
    assert points.get(stale_view, point.id).status == points.FAILED
    cat.fenced(successor.fence).check_owner("go on")
    assert jobs.finish(cat, successor.fence, ok=True, result={})


def test_a_job_that_ended_refuses_its_attempt_too(cat):
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    taken = jobs.claim(cat, job.id, "w", 30, lock_domain=False)
    view = cat.fenced(taken.fence)
    point = _point(view, job.id)
    jobs.finish(cat, taken.fence, ok=False, error="given up")
    with pytest.raises(LeaseLost):
        points.fail(view, point.id, "late clean-up")
    assert points.get(cat, point.id).status == points.WRITING


def test_a_point_that_is_not_being_written_is_never_completed(cat):
    point = _point(cat, "j")
    assert points.fail(cat, point.id, "failed")
    with pytest.raises(JobFailed, match="is failed, not writing"):
        points.complete(cat, point.id, ART, consistency="crash")
    assert points.get(cat, point.id).status == points.FAILED and points.get(cat, point.id).artifacts == ()
    assert not points.fail(cat, point.id, "again")  # only one call ever moves it


def test_a_lease_is_judged_by_the_database_clock_not_the_reapers(cat, monkeypatch):
    """A reaping host whose clock runs 90 s ahead does not take over a job renewed a
    moment ago: nothing in reap or claim reads the reaper's clock."""
    import datetime as real_datetime

    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    owner = jobs.claim(cat, job.id, "owner", 30, lock_domain=True)

    class Ahead(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime.now(tz) + real_datetime.timedelta(seconds=90)

    monkeypatch.setattr("virtwarden.catalog.models.datetime", Ahead)  # utcnow() of this process runs ahead
    assert jobs.reap(cat) == []
    assert not jobs.claim(cat, job.id, "ahead", 30, lock_domain=True).ok
    assert jobs.get(cat, job.id).state == jobs.RUNNING
    assert jobs.heartbeat(cat, owner.fence)


def test_chain_order_follows_the_database_clock(cat):
    first = _point(cat, "j1")
    points.complete(cat, first.id, ART, consistency="crash")
    second = _point(cat, "j2", parent_id=first.id, seq=1, level="incremental", checkpoint="virtwarden-2")
    points.complete(cat, second.id, ART, consistency="crash")
    assert second.created_at > first.created_at
    assert points.chain_head(cat, "u1", "nfs", "bitmap").id == second.id


def test_a_queued_job_whose_message_is_overdue_is_listed_for_sending_again(cat):
    # "Not due yet" holds only if it is asked within the wait: on a loaded machine a
    # statement can take a few tenths of a second, so each such look keeps a margin of
    # most of a second (a 0.2 s wait once failed here under load). "Due" only gets truer.
    wait = 1.0
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={}, resend_after=wait)
    assert jobs.due_for_send(cat) == []
    time.sleep(wait + 0.1)
    due = jobs.due_for_send(cat)
    assert [j.id for j in due] == [job.id]
    assert jobs.mark_sent(cat, due[0], resend_after=wait)
    assert not jobs.mark_sent(cat, due[0], resend_after=wait)  # another sweeper sent it already
    assert jobs.due_for_send(cat) == []
    time.sleep(wait + 0.1)
    again = jobs.due_for_send(cat)
    assert [j.sends for j in again] == [1]
    assert jobs.mark_sent(cat, again[0], resend_after=wait)
    time.sleep(wait + 0.1)
    assert jobs.due_for_send(cat) == []  # each resend waits twice as long as the one before
    time.sleep(wait)
    assert [j.id for j in jobs.due_for_send(cat)] == [job.id]
    jobs.postpone(cat, job.id, 30)  # a worker saw the message and will see it again
    assert jobs.due_for_send(cat) == []
    taken = jobs.claim(cat, job.id, "w", 30, lock_domain=False)
    jobs.postpone(cat, job.id, 0)  # a running job is not in the outbox
    assert jobs.due_for_send(cat) == []
    assert jobs.requeue(cat, taken.fence, "storage unreachable", delay=0, resend_after=0.1)
    time.sleep(0.2)
    assert [j.id for j in jobs.due_for_send(cat)] == [job.id]


def test_a_reaped_job_is_due_for_sending_at_once(cat):
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={}, resend_after=3600)
    jobs.claim(cat, job.id, "dead", 30, lock_domain=True)
    _expire(cat, job.id)
    assert [j.id for j in jobs.reap(cat)] == [job.id]
    assert [j.id for j in jobs.due_for_send(cat)] == [job.id]  # not a resend interval later


def test_the_sweep_that_reaps_a_job_sends_it_and_a_failed_send_leaves_it_due(cat, tmp_path):
    """A takeover costs the lease, not the lease plus a resend interval (the sweep used
    to leave a reaped job for the outbox's next resend, a minute by default): the sweep
    that requeues it sends it. With the broker away it stays due for the next sweep."""
    from virtwarden.worker.outbox import Sweeper

    from virtwarden import config as config_module
    from virtwarden.errors import BrokerUnavailable

    (tmp_path / "virtwarden.yaml").write_text(f"data_dir: {tmp_path}\nworker: {{resend_seconds: 3600}}\n")
    cfg = config_module.load(str(tmp_path / "virtwarden.yaml"), env={})
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={}, resend_after=3600)
    jobs.claim(cat, job.id, "dead", 30, lock_domain=True)
    _expire(cat, job.id)

    def broker_down(_job):
        raise BrokerUnavailable("the broker is away")

    report = Sweeper(cfg, cat, broker_down).sweep()
    assert (report.requeued, report.resent, report.unsent) == ([job.id], [], 1)
    sent = []
    report = Sweeper(cfg, cat, sent.append).sweep()
    assert report.requeued == [] and report.resent == [job.id] and [j.id for j in sent] == [job.id]
    assert jobs.due_for_send(cat) == []  # sent: the next resend waits its interval


def test_a_job_that_gives_up_runs_its_recovery_once_then_fails(cat):
    job = jobs.create(cat, kind="restore-in-place", domain="web01", host="h", params={}, max_attempts=1)
    jobs.claim(cat, job.id, "dead", 30, lock_domain=True)
    _expire(cat, job.id)
    queued = jobs.reap(cat, recoverable=lambda kind: kind == "restore-in-place")
    assert [j.id for j in queued] == [job.id] and "giving up" in queued[0].give_up
    recovery = jobs.claim(cat, job.id, "w", 30, lock_domain=True)
    assert recovery.ok and recovery.give_up == queued[0].give_up
    _expire(cat, job.id)  # the recovery's worker dies as well
    assert jobs.reap(cat, recoverable=lambda kind: True) == []
    ended = jobs.get(cat, job.id)
    assert ended.state == jobs.FAILED and "its recovery did not finish either" in ended.error


def test_points_left_writing_by_ended_jobs_are_found_and_failed_once(cat):
    live = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    ended = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    taken = jobs.claim(cat, ended.id, "w", 30, lock_domain=False)
    orphan = _point(cat, ended.id)
    in_progress = _point(cat, live.id, checkpoint="virtwarden-2")
    jobs.finish(cat, taken.fence, ok=False, error="worker lost")
    assert [p.id for p in points.unfinished_of_ended_jobs(cat)] == [orphan.id]
    assert points.fail_unfinished(cat, orphan.id, "swept")
    assert not points.fail_unfinished(cat, orphan.id, "swept again")
    assert not points.fail_unfinished(cat, in_progress.id, "not this one: its job is queued")
    assert points.get(cat, in_progress.id).status == points.WRITING


def test_the_database_clock_values_compare_with_python_written_times(cat):
    from virtwarden.catalog.models import utcnow

    with cat.session() as s:
        now, later = s.execute(select(db_now(), db_later(60))).one()
    assert abs((now - utcnow()).total_seconds()) < 5 and 59 < (later - now).total_seconds() < 61


def test_a_message_from_one_hosts_queue_never_runs_a_job_that_moved_to_another(cat):
    """The outbox may have sent a job to host a's queue twice; when the first copy
    re-routes the job to host b (its domain moved), the second copy must not run it on a."""
    job = jobs.create(cat, kind="backup", domain="web01", host="a", params={})
    first = jobs.claim(cat, job.id, "worker-on-a", 30, lock_domain=True, host="a")
    assert jobs.move(cat, first.fence, "b", "domain left a", resend_after=60) is not None
    late_copy = jobs.claim(cat, job.id, "worker-on-a", 30, lock_domain=True, host="a")
    assert (late_copy.ok, late_copy.why) == (False, "other-host")
    assert jobs.get(cat, job.id).state == jobs.QUEUED
    assert jobs.claim(cat, job.id, "worker-on-b", 30, lock_domain=True, host="b").ok
