"""Only the owner acts, with real faults: a worker stopped (SIGSTOP) past its lease while
another takes its job over, a worker stopped right after publishing its manifest, a
commit whose answer the network loses. Real guests, real Celery workers, real storage.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from virtwarden.catalog import jobs as job_rows
from virtwarden.catalog import points

from tests.faults import CommitAnswerLost, parent_of, pause_env, process_of, stopped, stopped_at, wait_file
from tests.guests import images_equal
from tests.harness import s3_storage_entry, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024


def _policy(vw, tmp_path: Path, target: str, strategy: str) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "p.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: p\n"
        f"spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: {target}\n"
        f"    strategy: {strategy}\n")
    vw.extra["policy_dir"] = str(pdir)


def _owner_worker(vw, cat, job_id: str):
    """The WorkerProcess whose pool child holds the job's lease."""
    child = process_of(job_rows.get(cat, job_id).lease_owner or "")
    return next(w for w in vw.workers if w.proc.pid == parent_of(child))


def _restore(vw, g, point_id: str, out: Path) -> None:
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err + r.out


def _stored_keys(vw, s3_settings) -> list[str]:
    from tests.s3server import s3_client

    s3 = s3_client(s3_settings.endpoint_url)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=s3_settings.bucket).get("Contents", [])]


@pytest.mark.parametrize("strategy", ["bitmap", "blockcommit"])
def test_a_worker_stopped_past_its_lease_changes_nothing_after_a_takeover(vw, guest_factory, s3_settings, tmp_path,
                                                                          strategy):
    vw.storage["s3"] = s3_storage_entry(s3_settings)
    _policy(vw, tmp_path, "s3", strategy)
    g = guest_factory(disks=2, size_mib=64)
    g.write_random("vda", 0, 24 * MiB)  # five 5 MiB parts
    g.write("vdb", 0, 4 * MiB, pattern=0x11)
    cat = vw.catalog()
    faults = tmp_path / "faults"  # whichever worker takes the backup stops in its upload
    vw.start_worker(env=pause_env("storing", faults))
    vw.start_worker(env=pause_env("storing", faults))

    r = vw.cli("backup", g.name, "--policy", "p", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at("storing", faults)  # mid-upload, past its lease: the other worker takes the job over
    stale = _owner_worker(vw, cat, job_id)
    expected = {t: g.shadow_copy(t, tmp_path / f"expected-{t}.raw") for t in ("vda", "vdb")}
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 240,
                    lambda: f"the takeover to finish; job {job_rows.get(cat, job_id)}; the workers' logs:\n"
                            + "\n".join(w.log.read_bytes().decode(errors="replace")[-4000:] for w in vw.workers))
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    before = {p.id: (p.status, p.manifest_sha256) for p in points.for_domain(cat, g.name)}
    keys_before = sorted(_stored_keys(vw, s3_settings))
    checkpoints_before = sorted(c.getName() for c in g.dom.listAllCheckpoints())

    stale.resume()  # it wakes up in the middle of its upload, holding an old token
    wait_for(lambda: b"lease lost" in stale.log.read_bytes(), 60, "the stopped worker to notice")
    time.sleep(3)  # anything it would still do, it would have done by now
    assert job_rows.get(cat, job_id) == done  # the job row is untouched
    assert {p.id: (p.status, p.manifest_sha256) for p in points.for_domain(cat, g.name)} == before
    assert sorted(_stored_keys(vw, s3_settings)) == keys_before
    assert sorted(c.getName() for c in g.dom.listAllCheckpoints()) == checkpoints_before
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["failed", "complete"]
    assert not [k for k in keys_before if listed[0]["id"] in k]  # the lost attempt's pieces are gone

    out = tmp_path / "restored"
    _restore(vw, g, listed[1]["id"], out)
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", expected[t]), t
    g.write("vda", 20 * MiB, MiB, pattern=0x77)  # the next incremental builds on the successor's point
    r = vw.cli("backup", g.name, "--policy", "p", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    assert r.json()["result"]["level"] == "incremental"
    out = tmp_path / "restored-next"
    _restore(vw, g, r.json()["result"]["point_id"], out)
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now-vda.raw"))


def test_a_worker_stopped_right_after_publishing_its_manifest_leaves_its_point_failed(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=64)
    g.write("vda", 0, 8 * MiB, pattern=0x42)
    cat = vw.catalog()
    faults = tmp_path / "faults"
    vw.start_worker(env=pause_env("after-manifest", faults))
    vw.start_worker(env=pause_env("after-manifest", faults))  # fires once: for whichever gets there first

    r = vw.cli("backup", g.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    pid = int(wait_file(faults / "after-manifest.pid", 120))
    wait_for(lambda: stopped(pid), 10, "the worker to stop itself")
    first = points.for_domain(cat, g.name)[0]
    manifest = vw.storage_path("nfs") / first.manifest_key
    assert manifest.exists() and first.status == "writing"  # published in storage, not in the catalog

    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the takeover to finish")
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert not manifest.exists()  # the successor's recovery unpublished the lost attempt's point
    os.kill(pid, signal.SIGCONT)  # it goes on to mark its point complete, with a stale token
    wait_for(lambda: any(b"lease lost" in w.log.read_bytes() or b"no longer owns" in w.log.read_bytes()
                         for w in vw.workers), 60, "the stopped worker to be refused")
    time.sleep(2)
    assert points.get(cat, first.id).status == "failed"
    assert job_rows.get(cat, job_id) == done
    listed = vw.cli("backups", g.name, "--json").json()
    complete = [p for p in listed if p["status"] == "complete"]
    assert len(complete) == 1 and complete[0]["id"] != first.id
    out = tmp_path / "restored"
    _restore(vw, g, complete[0]["id"], out)
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "expected.raw"))


def test_a_lost_commit_answer_never_deletes_a_complete_point(vw, guest_factory, pg_schema_url, tmp_path):
    """The UPDATE that marks the point complete commits on the server, and the network
    loses the answer: the worker reads the point again instead of undoing it."""
    g = guest_factory(disks=1, size_mib=64)
    g.write("vda", 0, 8 * MiB, pattern=0x24)
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")
    with CommitAnswerLost() as proxy:
        vw.extra["database_url"] = proxy.url(pg_schema_url)
        cat = vw.catalog()
        vw.start_worker()
        r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
        assert proxy.fired.is_set(), "the commit's answer was never dropped"
        assert r.code == 0, r.err + r.out
        job = r.json()
        assert job["state"] == "succeeded" and job["attempts"] == 1, job
        point = points.get(cat, job["result"]["point_id"])
        assert point.status == "complete"
        assert (vw.storage_path("nfs") / point.manifest_key).exists()
        for a in point.artifacts:
            assert (vw.storage_path("nfs") / a.key).exists()
        assert b"reading it again before deciding" in b"".join(w.log.read_bytes() for w in vw.workers)
        out = tmp_path / "restored"
        _restore(vw, g, point.id, out)
        assert images_equal(out / "vda.qcow2", expected)

        g.write("vda", 4 * MiB, MiB, pattern=0x99)  # the next incremental builds on that point, and restores
        r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
        assert r.code == 0, r.err + r.out
        assert r.json()["result"]["level"] == "incremental"
        assert points.get(cat, r.json()["result"]["point_id"]).parent_id == point.id
        out = tmp_path / "restored-next"
        _restore(vw, g, r.json()["result"]["point_id"], out)
        assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))


def test_a_backup_that_gives_up_runs_its_recovery_and_leaves_nothing(vw, guest_factory, s3_settings, tmp_path):
    """max_attempts 1 and its worker killed mid-upload: nothing retries the backup, but a
    worker still runs its recovery before marking it failed: the point is unlisted, its
    uploads and its checkpoint are gone."""
    from tests.harness import TEST_WORKER
    from tests.s3server import s3_client

    vw.storage["s3"] = s3_storage_entry(s3_settings)
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 1}
    g = guest_factory(disks=1, size_mib=64)
    g.write_random("vda", 0, 24 * MiB)  # five 5 MiB parts
    cat = vw.catalog()
    faults = tmp_path / "faults"  # whichever worker takes the backup stops in its upload
    vw.start_worker(env=pause_env("storing", faults))
    vw.start_worker(env=pause_env("storing", faults))
    r = vw.cli("backup", g.name, "--target", "s3", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at("storing", faults)
    _owner_worker(vw, cat, job_id).kill()

    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the job to give up")
    assert done.state == "failed" and "giving up" in (done.error or ""), done.error
    assert any(b"running the recovery of backup" in w.log.read_bytes() for w in vw.workers)
    [point] = points.for_domain(cat, g.name)
    assert point.status == "failed"
    s3 = s3_client(s3_settings.endpoint_url)
    assert not s3.list_objects_v2(Bucket=s3_settings.bucket).get("Contents")
    assert not s3.list_multipart_uploads(Bucket=s3_settings.bucket).get("Uploads")
    assert g.dom.listAllCheckpoints() == []
    assert not any(vw.scratch.glob("job-*"))


def test_the_sweep_unlists_a_point_left_writing_by_an_ended_job_and_removes_its_pieces(vw):
    """What neither a failure path nor a recovery reached (the last worker died, and so
    did its recovery): the sweep fails the point (catalog first) and removes its pieces."""
    from virtwarden.catalog import jobs
    from virtwarden.storage_backends import open_backend
    from virtwarden.storage_backends.repository import Repository
    from virtwarden.tasks.sweep import sweep_unfinished_points

    from virtwarden import config

    cfg = config.load(str(vw.write_config()), env={})
    cat = vw.catalog()
    backend = open_backend("nfs", cfg.storage_target("nfs"))
    repo = Repository(backend)
    job = jobs.create(cat, kind="backup", domain="web01", host="local", params={})
    taken = jobs.claim(cat, job.id, "w", 30, lock_domain=False)
    prefix = repo.point_prefix("web01", "c1", "p1")
    point = points.begin(cat.fenced(taken.fence), id="p1", domain="web01", domain_uuid="u1", host="local",
                         storage="nfs", strategy="bitmap", chain_id="c1", parent_id=None, seq=0, level="full",
                         reason="first", checkpoint=None, manifest_key=repo.manifest_key(prefix), job_id=job.id)
    backend.put_bytes(repo.artifact_key(prefix, "vda"), b"half an image")
    repo.write_manifest(prefix, {"point_id": "p1"})  # published, then the worker died before completing
    assert sweep_unfinished_points(cat, lambda name: open_backend(name, cfg.storage_target(name))) == []  # running
    jobs.finish(cat, taken.fence, ok=False, error="worker lost; recovery lost too")
    assert sweep_unfinished_points(cat, lambda name: open_backend(name, cfg.storage_target(name))) == [point.id]
    assert points.get(cat, point.id).status == "failed"
    assert list(backend.list(prefix)) == []


def test_a_worker_stopped_inside_its_heartbeats_transaction_on_postgresql_is_taken_over(vw, guest_factory,
                                                                                      pg_schema_url, tmp_path):
    """A PostgreSQL catalog. The worker running a backup stops (SIGSTOP) inside its
    heartbeat's transaction, holding its job's row; its kernel keeps the connection up.
    The server ends the session once it has sat idle in its transaction for
    idle_in_transaction_session_timeout (3 s here through the URL, 300 s as shipped),
    the row's lock goes with it, and the other worker takes the job over and finishes
    it: a point that restores bit for bit. Without that limit the reaper waited on the
    row for as long as the worker was stopped."""
    from tests.harness import TEST_WORKER

    vw.extra["database_url"] = pg_schema_url + "%20-cidle_in_transaction_session_timeout%3D3000"
    # A heartbeat every 0.2 s: the backup below lasts several, even on a fast machine
    # (300 MiB took 0.8 s on one, less than the suite's usual 1 s between heartbeats).
    vw.extra["worker"] = {**TEST_WORKER, "heartbeat_seconds": 0.2}
    g = guest_factory(disks=1, size_mib=320)
    g.write_random("vda", 0, 300 * MiB)
    faults = tmp_path / "faults"
    vw.start_worker(env=pause_env(job_rows.HEARTBEAT_WRITING, faults))
    vw.start_worker(env=pause_env(job_rows.HEARTBEAT_WRITING, faults))
    cat = vw.catalog()

    r = vw.cli("backup", g.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_pid = stopped_at(job_rows.HEARTBEAT_WRITING, faults)
    try:
        done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120,
                        lambda: f"the takeover to finish; job {job_rows.get(cat, job_id)}; the workers' logs:\n"
                                + "\n".join(w.log.read_bytes().decode(errors="replace")[-3000:] for w in vw.workers))
        assert (done.state, done.attempts) == ("succeeded", 2), done.error
    finally:
        os.kill(stopped_pid, signal.SIGKILL)
    out = tmp_path / "restored"
    assert done.result is not None
    _restore(vw, g, done.result["point_id"], out)
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "expected.raw"))
