"""Fleet mode: a worker per host (each consumes only its host's queue), one Redis broker,
one PostgreSQL catalog. Jobs run on the host where their domain runs, follow a domain
that moved after they were queued, and a worker killed mid-job loses nothing."""
from __future__ import annotations

import pytest
from virtwarden.catalog import jobs, moves, points

from tests.faults import pause_env
from tests.fleet import Fleet, fill_memory, fleet  # noqa: F401 - fleet is a fixture
from tests.guests import images_equal
from tests.harness import s3_storage_entry, wait_for

# host2 users share one xdist worker
pytestmark = [pytest.mark.libvirt, pytest.mark.xdist_group("host2"), pytest.mark.cli_in_process]
MiB = 1024 * 1024


def _ran(worker, job_id: str) -> bool:
    """Whether this worker process started the job (its runner logs each attempt)."""
    return f"job {job_id}: backup of" in worker.log.read_text()


def test_each_host_runs_its_own_jobs_and_a_killed_worker_loses_none(fleet: Fleet, guest_factory, s3_settings,
                                                                     tmp_path) -> None:
    f = fleet
    f.vw.storage["s3"] = s3_storage_entry(s3_settings)
    here = guest_factory(disks=1, size_mib=32)
    here.write_random("vda", 0, 4 * MiB)
    there = guest_factory(disks=1, size_mib=96)
    there.write_random("vda", 0, 64 * MiB)
    f.move(there.name, "local", "host2")
    w_local = f.vw.start_worker(hosts=["local"])
    # host2's worker stops itself in the middle of the upload (faults.pause_point), so the
    # kill below always finds the job running, however fast the machine.
    w_host2 = f.vw.start_worker(hosts=["host2"], env=pause_env("storing", tmp_path / "faults"))

    r = f.vw.cli("backup", there.name, "--target", "s3", "--json")
    assert r.code == 0, r.err
    far = r.json()
    r = f.vw.cli("backup", here.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    near = r.json()
    assert (far["host"], near["host"]) == ("host2", "local")

    wait_for(lambda: (tmp_path / "faults" / "storing.pid").exists(), 180, "host2's upload to stop mid-way")
    assert not jobs.get(f.cat, far["id"]).finished
    w_host2.kill()
    done = wait_for(lambda: (j := jobs.get(f.cat, near["id"])).finished and j, 120, "local's backup")
    assert done.state == "succeeded", done.error
    assert _ran(w_local, near["id"]) and not _ran(w_local, far["id"])

    # local's worker only reaps the dead worker's job: it is host2's to run.
    w_again = f.vw.start_worker(hosts=["host2"])
    done = wait_for(lambda: (j := jobs.get(f.cat, far["id"])).finished and j, 300, "host2's backup")
    assert done.state == "succeeded", done.error
    assert done.attempts == 2 and done.host == "host2"
    assert _ran(w_host2, far["id"]) and _ran(w_again, far["id"]) and not _ran(w_local, far["id"])

    listed = points.for_domain(f.cat, there.name)
    assert [(p.status, p.host) for p in listed] == [("failed", "host2"), ("complete", "host2")]
    assert [p.host for p in points.for_domain(f.cat, here.name)] == ["local"]
    out = tmp_path / "restored"
    r = f.vw.cli("restore", there.name, "--point", "latest", "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    assert images_equal(out / "vda.qcow2", there.shadow_copy("vda", tmp_path / "there.raw"))


def test_a_job_queued_for_the_host_a_domain_left_follows_it(fleet: Fleet, guest_factory) -> None:
    f = fleet
    g = guest_factory(disks=1, size_mib=16)
    g.write("vda", 0, MiB, pattern=0x44)
    w_host2 = f.vw.start_worker(hosts=["host2"])
    r = f.vw.cli("backup", g.name, "--target", "nfs", "--json")  # no worker serves local yet
    assert r.code == 0, r.err
    job = r.json()
    assert job["host"] == "local"
    f.move(g.name, "local", "host2")

    w_local = f.vw.start_worker(hosts=["local"])
    done = wait_for(lambda: (j := jobs.get(f.cat, job["id"])).finished and j, 120, "the backup")
    assert done.state == "succeeded", done.error
    assert (done.host, done.attempts) == ("host2", 1)
    assert "re-routed to host2" in w_local.log.read_text()
    assert _ran(w_host2, job["id"]) and not _ran(w_local, job["id"])
    [point] = points.for_domain(f.cat, g.name)
    assert (point.host, point.status, point.level) == ("host2", "complete", "full")


def test_a_job_for_a_domain_that_is_nowhere_fails_saying_so(fleet: Fleet, guest_factory) -> None:
    f = fleet
    g = guest_factory(disks=1, size_mib=16)
    r = f.vw.cli("backup", g.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    job = r.json()
    g.dom.destroy()
    g.dom.undefine()
    f.vw.start_worker()
    done = wait_for(lambda: (j := jobs.get(f.cat, job["id"])).finished and j, 120, "the backup")
    assert done.state == "failed"
    assert f"no domain {g.name!r} on any configured host (local, host2)" in done.error, done.error


def test_an_evacuation_whose_worker_dies_is_finished_by_another(fleet: Fleet, guest_factory) -> None:
    """libvirt cancels a migration whose driving connection is gone, so the guest stays
    on its host; the next attempt closes the dead attempt's record and moves it."""
    f = fleet
    g = guest_factory(disks=1, size_mib=16, start=False)
    fill_memory(g, 48)  # real data to move: at 8 MiB/s the migration takes seconds
    g.dom.create()
    f.move(g.name, "local", "host2")
    f.vw.hosts["host2"]["migration_bandwidth_mib"] = 8
    first = f.vw.start_worker(hosts=["host2"])
    r = f.vw.cli("evacuate", "host2", "--to", "local", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    wait_for(lambda: "%" in (jobs.get(f.cat, job_id).progress_text or ""), 120, "the migration to be under way")
    first.kill()
    wait_for(lambda: f.running_on(g.name) == ["host2"], 30, "the guest to run on host2 alone")

    f.vw.start_worker(hosts=["host2"])
    done = wait_for(lambda: (j := jobs.get(f.cat, job_id)).finished and j, 240, "the evacuation")
    assert done.state == "succeeded", done.error
    assert done.attempts == 2
    assert f.running_on(g.name) == ["local"] and not f.defined_on("host2", g.name)
    rows = [r for r in moves.for_job(f.cat, job_id) if r.domain == g.name]
    assert [r.outcome for r in rows] == ["failed", "succeeded"]
    assert "attempt interrupted" in rows[0].reason
