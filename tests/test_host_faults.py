"""Faults of the hosts themselves, with two real libvirt hosts and a PostgreSQL catalog:
a worker whose clock runs ahead (libfaketime) takes over no live job; a point made on a
host whose clock runs behind is still the newest; libvirtd restarted, or stopped, in the
middle of a push backup leaves nothing the retry trips over."""
from __future__ import annotations

import pytest
from virtwarden.catalog import jobs as job_rows
from virtwarden.catalog import points

from tests.faults import faketime_env
from tests.fleet import HOST2_URI, fleet, restart_host2, stop_host2_libvirtd  # noqa: F401 - fleet is a fixture
from tests.guests import images_equal
from tests.harness import TEST_WORKER, s3_storage_entry, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.xdist_group("host2"), pytest.mark.cli_in_process]
MiB = 1024 * 1024


def _policy(vw, tmp_path, target: str, retention: str = "") -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "p.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: p\n"
        f"spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: {target}\n{retention}")
    vw.extra["policy_dir"] = str(pdir)


def test_a_worker_whose_clock_runs_ahead_takes_over_no_live_job(fleet, vw, guest_factory, s3_settings, tmp_path):
    vw.storage["s3"] = s3_storage_entry(s3_settings)
    _policy(vw, tmp_path, "s3")
    g = guest_factory(disks=1, size_mib=320)
    g.write_random("vda", 0, 300 * MiB)
    cat = fleet.cat
    vw.start_worker(["local"])
    ahead = vw.start_worker(["host2"], env=faketime_env("+90s"))  # its sweeper reaps every second

    r = vw.cli("backup", g.name, "--policy", "p", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    wait_for(lambda: "storing" in (job_rows.get(cat, job_id).progress_text or ""), 120, "the upload to start")
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 240, "the backup")
    assert (done.state, done.attempts) == ("succeeded", 1), done.error
    assert b"stopped renewing" not in ahead.log.read_bytes()
    assert [p.status for p in points.for_domain(cat, g.name)] == ["complete"]


def test_the_newest_point_is_the_head_after_a_move_to_a_host_whose_clock_is_behind(fleet, vw, guest_factory,
                                                                                   tmp_path):
    _policy(vw, tmp_path, "nfs", "    retention:\n      keep_last: 1\n")
    g = guest_factory(disks=1, size_mib=64)
    g.write("vda", 0, MiB, pattern=0x10)
    cat = fleet.cat
    vw.start_worker(["local"])
    vw.start_worker(["host2"], env=faketime_env("-5m"))

    r = vw.cli("backup", g.name, "--policy", "p", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    first = r.json()["result"]["point_id"]
    g.write("vda", MiB, MiB, pattern=0x20)  # (the test guests are written to on local only)
    fleet.move(g.name, "local", "host2")
    r = vw.cli("backup", g.name, "--policy", "p", "--full", "--wait", "--json")  # made by host2's worker
    assert r.code == 0, r.err + r.out
    assert r.json()["host"] == "host2"
    second = r.json()["result"]["point_id"]
    assert r.json()["result"].get("retention", {}).get("deleted"), r.json()["result"]
    assert points.get(cat, second).created_at > points.get(cat, first).created_at
    # keep_last: 1 kept the point just made, not the one a clock 5 minutes ahead made.
    assert {p.id: p.status for p in points.for_domain(cat, g.name)} == {first: "deleted", second: "complete"}

    r = vw.cli("backup", g.name, "--policy", "p", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    third = points.get(cat, r.json()["result"]["point_id"])
    assert (third.level, third.parent_id) == ("incremental", second)
    out = tmp_path / "restored"
    assert vw.cli("restore", g.name, "--point", third.id, "--to-dir", str(out), "--wait").code == 0
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "expected.raw"))


def _slow_down_backup(dom, timeout: float = 120) -> None:
    """Cap the speed of the guest's QEMU backup job (4 MiB/s) the moment it appears, so
    the copy lasts long enough to restart libvirtd in the middle of it. Test-only, through
    the monitor: libvirt has no speed setting for backup jobs. The monitor is asked in a
    tight loop: a whole 256 MiB copy can take well under a second on an idle machine."""
    import json

    import libvirt_qemu

    def backup_job() -> dict | None:
        running = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-jobs"}', 0))["return"]
        return next((j for j in running if j["type"] == "backup"), None)

    job = wait_for(backup_job, timeout, "a QEMU backup job", poll=0.002)
    assert job["status"] == "running", f"the backup job was {job['status']} before it could be slowed"
    libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "block-job-set-speed",
                                                     "arguments": {"device": job["id"], "speed": 4 << 20}}), 0)


def test_a_libvirtd_restart_during_a_push_backup_is_recovered_by_the_retry(fleet, vw, guest_factory, tmp_path):
    import libvirt

    g = guest_factory(disks=1, size_mib=576)
    g.write_random("vda", 0, 512 * MiB)  # a copy long enough to be caught running, even on an idle host
    fleet.move(g.name, "local", "host2")
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 10, "retry_delay_seconds": 2}
    cat = fleet.cat
    vw.start_worker(["host2"])
    conn = libvirt.open(HOST2_URI)

    r = vw.cli("backup", g.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    _slow_down_backup(conn.lookupByName(g.name))
    conn.close()
    stop_host2_libvirtd()  # the guest and its backup job run on in QEMU
    conn = restart_host2(libvirt, HOST2_URI)
    dom = conn.lookupByName(g.name)

    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 300, "the retried backup")
    assert done.state == "succeeded", done.error
    assert done.attempts >= 2
    log = b"".join(w.log.read_bytes() for w in vw.workers)
    # The retry settled what the lost attempt left: the backup job, when the restarted
    # libvirtd had recovered it (it usually has), and the attempt's checkpoint.
    assert (b"aborting the backup job an unfinished attempt left" in log
            or b"(no complete point has it)" in log), log.decode()[-6000:]
    listed = [p for p in points.for_domain(cat, g.name)]
    complete = [p for p in listed if p.status == "complete"]
    assert len(complete) == 1 and all(p.status == "failed" for p in listed if p is not complete[0])
    assert dom.jobStats(0).get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE  # no orphaned libvirt job
    assert [c.getName() for c in dom.listAllCheckpoints()] == [complete[0].checkpoint]
    repository = vw.storage_path("nfs")
    stored = sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*") if p.is_file())
    prefix = complete[0].manifest_key.rsplit("/", 1)[0] + "/"
    assert stored and all(k.startswith(prefix) for k in stored), stored  # nothing else, no temp files
    assert not any(vw.scratch.glob("job-*")), list(vw.scratch.iterdir())
    out = tmp_path / "restored"
    assert vw.cli("restore", g.name, "--point", complete[0].id, "--to-dir", str(out), "--wait").code == 0
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "expected.raw"))
    assert dom.isActive()  # the guest ran on throughout


def test_a_libvirtd_that_stops_answering_fails_the_attempt_and_the_retry_backs_up(fleet, vw, guest_factory,
                                                                                    tmp_path):
    """host2's libvirtd stopped (SIGSTOP) in the middle of a push backup: its socket still
    accepts and libvirt would wait for ever. Keepalive closes the job's connection, the
    attempt fails as transient while libvirtd is still stopped; the next attempt gives up
    opening a connection after its timeout. Once libvirtd runs again, a retry settles the
    backup job the first attempt left and makes a point that restores bit for bit."""
    import os
    import signal

    import libvirt

    from tests.fleet import HOST2_PID

    g = guest_factory(disks=1, size_mib=576)
    g.write_random("vda", 0, 512 * MiB)
    fleet.move(g.name, "local", "host2")
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 20, "retry_delay_seconds": 2}
    vw.extra["libvirt"] = {"keepalive_interval_seconds": 1, "keepalive_count": 3, "open_timeout_seconds": 5}
    cat = fleet.cat
    vw.start_worker(["host2"])
    conn = libvirt.open(HOST2_URI)
    dom = conn.lookupByName(g.name)

    r = vw.cli("backup", g.name, "--target", "nfs", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    _slow_down_backup(dom)  # 4 MiB/s: the copy runs on for minutes
    conn.close()
    pid = int(HOST2_PID.read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        lost = wait_for(lambda: "keepalive" in ((j := job_rows.get(cat, job_id)).progress_text or "") and j, 60,
                        "the attempt on the stopped libvirtd to fail")
        assert lost.state == "queued" and lost.attempts == 1, (lost.state, lost.attempts, lost.progress_text)
        assert "attempt 1 failed" in lost.progress_text and "connection to" in lost.progress_text
        unanswered = wait_for(lambda: "did not answer within 5 s" in ((j := job_rows.get(cat, job_id)).progress_text
                                                                      or "") and j, 60, "the next attempt to give up")
        assert unanswered.state == "queued" and unanswered.attempts >= 2, unanswered.progress_text
    finally:
        os.kill(pid, signal.SIGCONT)

    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 300, "the retried backup")
    assert done.state == "succeeded", done.error
    log = b"".join(w.log.read_bytes() for w in vw.workers)
    assert b"aborting the backup job an unfinished attempt left" in log, log.decode()[-6000:]
    conn = libvirt.open(HOST2_URI)
    dom = conn.lookupByName(g.name)
    listed = points.for_domain(cat, g.name)
    complete = [p for p in listed if p.status == "complete"]
    assert len(complete) == 1 and all(p.status == "failed" for p in listed if p is not complete[0])
    assert dom.jobStats(0).get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE
    assert [c.getName() for c in dom.listAllCheckpoints()] == [complete[0].checkpoint]
    out = tmp_path / "restored"
    assert vw.cli("restore", g.name, "--point", complete[0].id, "--to-dir", str(out), "--wait").code == 0
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "expected.raw"))
    assert dom.isActive()
    conn.close()


def test_hosts_reports_a_hung_libvirtd_as_down_after_the_open_timeout(fleet, vw):
    """On call, `virtwarden hosts` while host2's libvirtd is stopped: the command ends,
    host2 down with the reason, the main host up (before, it waited for ever)."""
    import os
    import signal
    import time

    from tests.fleet import HOST2_PID

    vw.extra["libvirt"] = {"open_timeout_seconds": 2}
    pid = int(HOST2_PID.read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = vw.cli("hosts", "--json", in_process=False, timeout=60)
        took = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.code == 0, r.err
    states = {h["name"]: h for h in r.json()}
    assert states["local"]["state"] == "up" and states["host2"]["state"] == "down", states
    assert "did not answer within 2 s" in states["host2"]["error"], states["host2"]
    assert took < 30, took
    r = vw.cli("hosts", "--json", in_process=False, timeout=60)
    assert {h["name"]: h["state"] for h in r.json()} == {"local": "up", "host2": "up"}


def test_the_schedulers_kept_connection_to_a_restarted_libvirtd_is_replaced_within_the_tick(fleet, guest_factory):
    """The scheduler keeps a connection per host between ticks. host2's libvirtd restarts
    between two ticks: the next listing finds the kept connection dead, opens a new one
    and lists host2 in that same tick (no tick with host2 left out); a host that does not
    answer at all is left out with the reason, and the others are listed."""
    import libvirt

    from virtwarden import config
    from virtwarden.daemons.scheduler import HostLister

    g = guest_factory(disks=1, size_mib=16)
    fleet.move(g.name, "local", "host2")
    fleet.vw.hosts["gone"] = {"uri": "qemu+tcp://127.0.0.1:1/system", "group": "rack2"}
    cfg = config.load(str(fleet.vw.write_config()), env={})
    lister = HostLister(cfg)
    try:
        found, failed = lister.domains()
        assert g.name in [f.name for f in found["host2"]] and set(failed) == {"gone"}, failed
        kept = lister.connections.kept("host2")
        stop_host2_libvirtd()  # the guest runs on in QEMU
        restart_host2(libvirt, HOST2_URI).close()
        found, failed = lister.domains()
        assert set(failed) == {"gone"} and "cannot connect" in failed["gone"], failed
        assert g.name in [f.name for f in found["host2"]] and "local" in found
        assert lister.connections.kept("host2") not in (None, kept)  # replaced by a new connection
    finally:
        lister.close()


def test_a_hung_libvirtd_costs_the_listing_its_timeout_and_the_other_hosts_are_listed(fleet, guest_factory):
    """host2's libvirtd stopped with SIGSTOP: its TCP port still accepts and libvirt waits
    for an answer for ever. The scheduler's listing leaves host2 out after its timeout,
    lists the main host on time, skips host2 at once while that call is still out, and
    lists it again once libvirtd runs on."""
    import os
    import signal
    import time

    from tests.fleet import HOST2_PID
    from virtwarden import config
    from virtwarden.daemons.scheduler import HostLister

    g = guest_factory(disks=1, size_mib=16)
    fleet.vw.extra["scheduler"] = {"host_timeout_seconds": 2}
    cfg = config.load(str(fleet.vw.write_config()), env={})
    lister = HostLister(cfg)
    pid = int(HOST2_PID.read_text().strip())
    single = None
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        found, failed = lister.domains()
        took = time.monotonic() - start
        assert g.name in [f.name for f in found["local"]] and set(failed) == {"host2"}, failed
        assert "did not answer within 2 s" in failed["host2"] and took < 10, (took, failed)
        start = time.monotonic()
        found, failed = lister.domains()
        assert "has not come back yet" in failed["host2"] and "local" in found and time.monotonic() - start < 2
        # One listing thread, host2 first: it waits on host2; the main host, never
        # started, is said so, and is not held back by later ticks.
        fleet.vw.extra["scheduler"] = {"host_timeout_seconds": 2, "hosts_in_parallel": 1}
        single = HostLister(config.load(str(fleet.vw.write_config()), env={}))
        found, failed = single.domains(["host2", "local"])
        assert not found and "every listing thread was waiting" in failed["local"], failed
        found, failed = single.domains(["host2", "local"])
        assert "local" in found and "has not come back yet" in failed["host2"], failed
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        listed = wait_for(lambda: "host2" in (found := lister.domains()[0]) and found, 60, "host2 to be listed again")
        assert "local" in listed
    finally:
        lister.close()
        if single is not None:
            single.close()
