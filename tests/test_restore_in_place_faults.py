"""In-place restores interrupted by a worker's death, with real faults: the worker
running the job SIGKILLs itself at a named point (virtwarden/faults.py), another worker
takes the job over. Real 2-disk guests under libvirtd, real Celery workers, real storage.

Whatever the moment of death, the domain ends consistent across all its disks (all old
or all restored, never a mix), its definition matches them, and nothing is ever
restored, swapped or discarded twice.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from virtwarden.catalog import jobs as job_rows

from tests.faults import kill_env, wait_file
from tests.guests import images_equal
from tests.harness import TEST_WORKER, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024
DISKS = ("vda", "vdb")


def _inactive_xml(g) -> str:
    import libvirt

    return g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def _domain_id(g) -> int:
    """The running domain's id, as libvirt says now (a virDomain keeps the id it was
    looked up with); a new one after every start, -1 when it is off."""
    return g.conn.lookupByName(g.name).ID()


def _prepared(vw, g, tmp_path: Path) -> tuple[str, dict[str, Path], dict[str, Path]]:
    """A backed-up guest that wrote more since: the point's id, each disk as the point
    holds it and as it is now (what a restore replaces)."""
    g.write_random("vda", MiB, 2 * MiB)
    g.write("vdb", 0, 2 * MiB, pattern=0x11)
    r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    at_point = {t: g.shadow_copy(t, tmp_path / f"point-{t}.raw") for t in DISKS}
    g.write("vda", 0, MiB, pattern=0x21)
    g.write("vdb", 4 * MiB, MiB, pattern=0x22)
    now = {t: g.shadow_copy(t, tmp_path / f"now-{t}.raw") for t in DISKS}
    return r.json()["result"]["point_id"], at_point, now


def _restore_in_place(vw, g, point_id: str, *extra: str) -> str:
    r = vw.cli("restore", g.name, "--in-place", "--point", point_id, "--shutdown-timeout", "1", "--json", *extra)
    assert r.code == 0, r.err
    return r.json()["id"]


def _killed_at(worker, faults: Path, point: str) -> None:
    """Wait until the worker's job process killed itself at ``point``; then make sure no
    part of that worker lives on, so that another worker takes the job over."""
    wait_file(faults / f"{point}.pid", 180)
    worker.kill()


def _ended(cat, job_id: str, timeout: float = 180):
    return wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, timeout, "the job to end")


def _leftovers(vw, g, job_id: str) -> list[str]:
    here = [p.name for p in g.workdir.iterdir() if "restoring" in p.name or ".partial" in p.name]
    scratch = [p.name for p in vw.scratch.glob(f"job-{job_id}*")] if vw.scratch.exists() else []
    return here + scratch


def _no_leftovers(vw, g, job_id: str) -> None:
    """Nothing of the job stays beside the disks or in scratch. The swap journal goes
    just after the job's outcome is recorded (never before: an attempt that dies between
    the two must still find it), so wait a moment for it; anything left after that stays for good."""
    wait_for(lambda: not _leftovers(vw, g, job_id), 10,
             lambda: f"the job's leftovers to go: {_leftovers(vw, g, job_id)}")


def test_a_restore_killed_after_its_first_disk_and_given_up_puts_every_disk_and_the_definition_back(
        vw, guest_factory, tmp_path):
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 1}
    g = guest_factory(disks=2, size_mib=32)
    faults = tmp_path / "faults"
    dying = vw.start_worker(env=kill_env("in-place-after-first-disk", faults))
    cat = vw.catalog()
    point_id, at_point, before = _prepared(vw, g, tmp_path)
    definition = _inactive_xml(g)

    job_id = _restore_in_place(vw, g, point_id)
    _killed_at(dying, faults, "in-place-after-first-disk")
    # Left half done: the domain off, vda restored, vdb not.
    assert not g.dom.isActive()
    assert images_equal(g.disk_path("vda"), at_point["vda"])
    assert images_equal(g.disk_path("vdb"), before["vdb"])

    recovering = vw.start_worker()  # its sweep gives the job up, and its recovery runs
    done = _ended(cat, job_id)
    assert done.state == "failed" and "giving up" in done.error, done.error
    assert b"running the recovery" in recovering.log.read_bytes()
    assert "every disk of" in done.error and "put back as they were before the restore" in done.error, done.error
    assert "runs again" in done.error, done.error
    assert g.dom.isActive(), "the domain ran before the restore and must run again"
    assert _inactive_xml(g) == definition
    assert not list(g.workdir.glob("*.before-restore-*"))
    _no_leftovers(vw, g, job_id)
    g.dom.destroy()  # QEMU writes out what it cached, so the files can be compared
    for t in DISKS:
        assert images_equal(g.disk_path(t), before[t]), t


def test_a_restore_killed_right_after_its_swap_is_finished_by_the_retry_without_restoring_again(
        vw, guest_factory, tmp_path):
    g = guest_factory(disks=2, size_mib=32)
    faults = tmp_path / "faults"
    dying = vw.start_worker(env=kill_env("in-place-after-swap", faults))
    cat = vw.catalog()
    point_id, at_point, _ = _prepared(vw, g, tmp_path)
    assert [c.getName() for c in g.dom.listAllCheckpoints()]

    job_id = _restore_in_place(vw, g, point_id, "--start", "--discard-old")
    _killed_at(dying, faults, "in-place-after-swap")
    assert not g.dom.isActive()
    aside = sorted(str(p) for p in g.workdir.glob("*.before-restore-*"))
    assert len(aside) == 2  # not discarded yet
    swapped_in = {t: os.stat(g.disk_path(t)).st_ino for t in DISKS}
    for t in DISKS:
        assert images_equal(g.disk_path(t), at_point[t]), t

    # The guest runs again on its restored disks and writes before any retry comes.
    g.dom.create()
    running = _domain_id(g)
    for t in DISKS:
        shutil.copyfile(at_point[t], g.shadows[t])  # what the disks hold now
    g.write("vda", 3 * MiB, MiB, pattern=0x5A)
    g.write("vdb", 6 * MiB, 2 * MiB, pattern=0x5B)

    second = vw.start_worker()
    done = _ended(cat, job_id)
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert _domain_id(g) == running, "the domain was shut off again"
    assert {t: os.stat(g.disk_path(t)).st_ino for t in DISKS} == swapped_in, "the disks were swapped again"
    assert b"finishing the restore without restoring again" in second.log.read_bytes()
    result = done.result
    assert result.get("resumed") and result["point_id"] == point_id and result["started"]
    assert sorted(result["discarded"]) == aside and result["set_aside"] == []  # the first swap's, once
    assert not list(g.workdir.glob("*.before-restore-*"))
    _no_leftovers(vw, g, job_id)
    assert [c.getName() for c in g.dom.listAllCheckpoints()] == []

    g.write("vda", 5 * MiB, MiB, pattern=0x5C)  # and the guest goes on writing
    expected = {t: g.shadow_copy(t, tmp_path / f"expected-{t}.raw") for t in DISKS}
    g.dom.destroy()
    for t in DISKS:
        assert images_equal(g.disk_path(t), expected[t]), t


def test_a_restore_given_up_after_its_swap_ends_failed_saying_the_disks_hold_the_point(vw, guest_factory, tmp_path):
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 1}
    g = guest_factory(disks=2, size_mib=32)
    faults = tmp_path / "faults"
    dying = vw.start_worker(env=kill_env("in-place-after-swap", faults))
    cat = vw.catalog()
    point_id, at_point, before = _prepared(vw, g, tmp_path)

    job_id = _restore_in_place(vw, g, point_id)
    _killed_at(dying, faults, "in-place-after-swap")
    swapped_in = {t: os.stat(g.disk_path(t)).st_ino for t in DISKS}
    vw.start_worker()
    done = _ended(cat, job_id)
    assert done.state == "failed" and "giving up" in done.error, done.error
    assert f"holds point {point_id} and they are consistent" in done.error, done.error
    assert "the replaced images are kept as" in done.error, done.error
    assert {t: os.stat(g.disk_path(t)).st_ino for t in DISKS} == swapped_in  # finished, not undone or redone
    assert not g.dom.isActive()  # no --start: it stays off, as after a restore that succeeds
    _no_leftovers(vw, g, job_id)
    assert [c.getName() for c in g.dom.listAllCheckpoints()] == []
    for t in DISKS:
        assert images_equal(g.disk_path(t), at_point[t]), t
        aside = list(g.workdir.glob(f"{t}.qcow2.before-restore-*"))
        assert len(aside) == 1 and str(aside[0]) in done.error
        assert images_equal(aside[0], before[t], fmt_a="qcow2"), t


@pytest.mark.parametrize("point", ["in-place-rebuilt", "in-place-stopped"])
def test_a_retry_of_a_restore_whose_swap_never_began_restores_normally(vw, guest_factory, tmp_path, point):
    g = guest_factory(disks=2, size_mib=32)
    faults = tmp_path / "faults"
    dying = vw.start_worker(env=kill_env(point, faults))
    cat = vw.catalog()
    point_id, at_point, before = _prepared(vw, g, tmp_path)

    job_id = _restore_in_place(vw, g, point_id)
    _killed_at(dying, faults, point)
    assert g.dom.isActive() == (point == "in-place-rebuilt")
    for t in DISKS:
        assert len(list(g.workdir.glob(f".{t}.qcow2.restoring-*"))) == 1, t  # the dead attempt's images

    second = vw.start_worker()
    done = _ended(cat, job_id)
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert done.result["stopped"] in ("shutdown", "destroyed") and "resumed" not in done.result
    if point == "in-place-stopped":  # it ran before: started again, then stopped for the swap
        assert b"putting it back as it was" in second.log.read_bytes()
    assert not g.dom.isActive()
    _no_leftovers(vw, g, job_id)
    for t in DISKS:
        assert images_equal(g.disk_path(t), at_point[t]), t
        aside = list(g.workdir.glob(f"{t}.qcow2.before-restore-*"))
        assert len(aside) == 1, aside  # one swap only
        assert images_equal(aside[0], before[t], fmt_a="qcow2"), t
