"""Snapshot rotation on real guests and a real worker: predictable names, retention per
policy, other people's snapshots left alone, external snapshots merged back when they
rotate out with the guest's data intact, and clear refusals that change nothing."""
from __future__ import annotations

import re
import subprocess
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.guests import images_equal

pytestmark = pytest.mark.cli_in_process

MiB = 1024 * 1024


def _policy(vw, tmp_path: Path, snapshots: str, name: str = "snaps") -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: virtwarden/v1
        kind: Policy
        metadata: {{name: {name}}}
        spec:
          selector: {{domains: ["vwtest-*"]}}
          snapshots: {snapshots}
        """))
    vw.extra["policy_dir"] = str(pdir)


def _snapshot(vw, domain: str, *extra: str) -> dict:
    r = vw.cli("snapshot", domain, "--wait", "--json", *extra)
    assert r.code == 0, r.err + r.out
    job = r.json()
    assert job["state"] == "succeeded", job
    return job["result"]


def _libvirt_snapshots(g) -> list[str]:
    return sorted(g.dom.snapshotListNames(0))


def _active_image(g, target: str) -> str:
    for disk in ET.fromstring(g.xml()).iterfind("devices/disk"):
        if disk.find("target").get("dev") == target:
            return disk.find("source").get("file")
    raise KeyError(target)


@pytest.mark.libvirt
def test_rotation_keeps_the_newest_and_never_touches_other_snapshots(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    # Someone else's snapshots: one by hand, one merely named like ours.
    g.dom.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    g.dom.snapshotCreateXML("<domainsnapshot><name>virtwarden-snaps-20200101T000000Z</name></domainsnapshot>", 0)
    _policy(vw, tmp_path, "{type: internal, retention: {keep_last: 2}}")
    vw.start_worker()

    taken = []
    for i in range(4):
        g.write("vda", i * MiB, 64 * 1024, pattern=0x10 + i)
        result = _snapshot(vw, g.name)
        assert re.fullmatch(r"virtwarden-snaps-\d{8}T\d{6}Z(-\d+)?", result["snapshot"]), result
        assert (result["type"], result["consistency"], result["policy"]) == ("internal", "system", "snaps")
        taken.append(result["snapshot"])
    assert result["deleted"] == [taken[1]] and result["kept"] == taken[2:]

    assert _libvirt_snapshots(g) == sorted(["before-upgrade", "virtwarden-snaps-20200101T000000Z", *taken[2:]])
    listed = vw.cli("snapshots", g.name, "--json").json()
    assert [(s["name"], s["state"]) for s in listed] == [(taken[2], "present"), (taken[3], "present")]
    table = vw.cli("snapshots", g.name)
    assert table.code == 0 and taken[3] in table.out and "system" in table.out

    # With no policy governing, a snapshot is named 'manual' and no rotation touches it.
    policy_dir = vw.extra["policy_dir"]
    vw.extra["policy_dir"] = str(tmp_path / "no-policies")
    manual = _snapshot(vw, g.name)
    assert manual["snapshot"].startswith("virtwarden-manual-") and manual["policy"] is None
    vw.extra["policy_dir"] = policy_dir
    again = _snapshot(vw, g.name)
    assert again["deleted"] == [taken[2]]
    assert manual["snapshot"] in _libvirt_snapshots(g) and "before-upgrade" in _libvirt_snapshots(g)


@pytest.mark.libvirt
def test_someone_deleting_our_snapshot_is_noticed_not_fatal(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    _policy(vw, tmp_path, "{type: internal, retention: {keep_last: 5}}")
    vw.start_worker()
    first = _snapshot(vw, g.name)["snapshot"]
    g.dom.snapshotLookupByName(first, 0).delete(0)
    # Names are made to the second and only kept apart from snapshots libvirt still has:
    # taken within the same second, the second snapshot would get the deleted one's name.
    time.sleep(1.1)
    second = _snapshot(vw, g.name)["snapshot"]
    assert second != first
    states = {s["name"]: s["state"] for s in vw.cli("snapshots", g.name, "--json").json()}
    assert states == {second: "present"}
    with vw.catalog().session() as s:
        from virtwarden.catalog.models import Snapshot

        row = s.query(Snapshot).filter_by(name=first).one()
        assert row.state == "missing" and row.deleted_at is not None


@pytest.mark.libvirt
def test_external_snapshots_rotate_by_merging_and_keep_the_guests_data(vw, guest_factory, tmp_path):
    g = guest_factory(disks=2, size_mib=16)
    _policy(vw, tmp_path, "{type: external, quiesce: auto, retention: {keep_last: 1}}")
    vw.start_worker()
    base = {t: str(g.disk_path(t)) for t in ("vda", "vdb")}

    g.write("vda", 0, MiB, pattern=0xA1)
    first = _snapshot(vw, g.name)
    # No guest agent in this guest: the snapshot is crash-consistent and says so.
    assert (first["type"], first["consistency"]) == ("external", "crash")
    for t in ("vda", "vdb"):
        assert _active_image(g, t).endswith(f".{first['snapshot']}.qcow2")
    g.write("vdb", 2 * MiB, MiB, pattern=0xB2)

    second = _snapshot(vw, g.name)
    assert second["deleted"] == [first["snapshot"]]
    assert _libvirt_snapshots(g) == [second["snapshot"]]
    # The first overlay was merged away; the chain is base <- second overlay.
    for t in ("vda", "vdb"):
        assert _active_image(g, t).endswith(f".{second['snapshot']}.qcow2")
        assert not Path(base[t]).with_name(f"{Path(base[t]).stem}.{first['snapshot']}.qcow2").exists()
    g.write("vda", 3 * MiB, MiB, pattern=0xC3)

    for t in ("vda", "vdb"):  # every write the guest made is in its live chain
        g.flush(t)  # QEMU keeps qcow2 metadata cached: without this the file may not show the last write yet
        assert images_equal(_active_image(g, t), g.shadow_copy(t, tmp_path / f"{t}.raw"), force_share=True)


@pytest.mark.libvirt
def test_refusals_are_clear_and_change_nothing(vw, guest_factory, tmp_path):
    raw = guest_factory(disks=1, size_mib=16, raw=("vda",))
    _policy(vw, tmp_path, "{type: internal}")
    vw.start_worker()
    r = vw.cli("snapshot", raw.name, "--wait")
    assert r.code != 0
    assert "internal snapshots need qcow2 disks, and vda is not; use type: external" in r.err
    assert _libvirt_snapshots(raw) == []
    assert vw.cli("snapshots", raw.name, "--json").json() == []

    r = vw.cli("snapshot", "vwtest-no-such-domain", "--wait")
    assert r.code == 4 and "no domain 'vwtest-no-such-domain'" in r.err

    r = vw.cli("snapshot", raw.name, "--policy", "nope", "--wait")
    assert r.code == 4 and "no policy named 'nope'" in r.err


@pytest.mark.libvirt
def test_quiesce_always_without_an_agent_takes_no_snapshot(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    _policy(vw, tmp_path, "{type: external, quiesce: always}")
    vw.start_worker()
    before = _active_image(g, "vda")
    r = vw.cli("snapshot", g.name, "--wait")
    assert r.code != 0 and "quiesce is 'always' but the filesystems cannot be frozen" in r.err, r.err
    assert _libvirt_snapshots(g) == [] and _active_image(g, "vda") == before
    assert vw.cli("snapshots", g.name, "--json").json() == []
    leftovers = [p.name for p in Path(before).parent.iterdir() if "virtwarden-" in p.name]
    assert leftovers == []


@pytest.mark.libvirt
def test_a_shut_off_domain_gets_an_offline_snapshot(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16, start=False)
    _policy(vw, tmp_path, "{type: internal}")
    vw.start_worker()
    result = _snapshot(vw, g.name)
    assert result["consistency"] == "offline"
    info = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(g.disk_path("vda"))],
                          capture_output=True, text=True, check=True).stdout
    assert result["snapshot"] in info
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.libvirt
def test_an_external_snapshot_of_an_agent_guest_is_quiesced(vw, agent_guest_factory, tmp_path):
    """The guest's filesystem is frozen for the snapshot's instant: data held only in
    its page cache is in the frozen image, whose ext4 is clean; the guest is thawed
    and writable afterwards."""
    from tests.test_quiesce import (
        FREEZE_THEN_THAW,
        _blocks_on_disk,
        _fs_state,
        _in_order,
        _live_raw,
        _raw,
        _thawed_and_writable,
        _write_blocks,
    )

    _policy(vw, tmp_path, "{type: external, quiesce: auto}")
    g = agent_guest_factory()
    vw.start_worker()
    data = _write_blocks(g, "/mnt/snapfile", "snapshot", 128)
    assert _blocks_on_disk(_live_raw(g, tmp_path / "live.raw"), data) == 0, "written back already"
    mark = len(g.serial_log())

    result = _snapshot(vw, g.name)

    assert (result["type"], result["consistency"]) == ("external", "quiesced"), result
    assert _in_order(g.serial_log()[mark:], FREEZE_THEN_THAW), g.serial_log()[mark:]
    _thawed_and_writable(g)
    frozen = _raw(g.disk, tmp_path / "frozen.raw", force_share=True)  # the layer below the new overlay
    assert _blocks_on_disk(frozen, data) == 128
    assert _fs_state(frozen) == (False, 0)
    assert [s["consistency"] for s in vw.cli("snapshots", g.name, "--json").json()] == ["quiesced"]


@pytest.mark.libvirt
def test_internal_and_external_snapshots_are_not_mixed(vw, guest_factory, tmp_path):
    """libvirt cannot delete either kind once the other is stacked on it, so a snapshot
    rotation could never remove: it is refused before anything is taken."""
    g = guest_factory(disks=1, size_mib=16)
    g.dom.snapshotCreateXML("<domainsnapshot><name>by-hand</name></domainsnapshot>", 0)  # internal
    _policy(vw, tmp_path, "{type: external}")
    vw.start_worker()
    before = _active_image(g, "vda")
    r = vw.cli("snapshot", g.name, "--wait")
    assert r.code == 7, r.err  # the job failed: libvirt cannot do it (EXIT_HYPERVISOR)
    assert "has internal snapshots (by-hand): libvirt cannot delete an external snapshot" in r.err
    assert _libvirt_snapshots(g) == ["by-hand"] and _active_image(g, "vda") == before
    assert vw.cli("snapshots", g.name, "--json").json() == []
