"""Restores as a new domain and in place, point selection by time, and dry runs.

The first tests are pure (planning, time parsing, XML rewriting, the undoable disk
swap on plain files). The rest run real guests under libvirtd and a real worker: a
restored copy must boot (the 512-byte marker disk prints its marker on the serial
console), a domain restored in place must hold the point's bytes exactly and boot, and
dry runs and refusals must change nothing at all.
"""
from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.guests import images_equal
from tests.harness import wait_for

pytestmark = pytest.mark.cli_in_process

KiB, MiB = 1024, 1024 * 1024
MARKER = b"VIRTWARDEN-RESTORE-BOOTED"


# --- pure: time, plan, XML, swap ----------------------------------------------------------

def test_times_with_and_without_a_zone():
    from virtwarden.tasks.restore import InvalidRestoreRequest, parse_time

    assert parse_time("2025-03-30T12:00Z") == datetime(2025, 3, 30, 12, tzinfo=UTC)
    assert parse_time("2025-03-30T14:00:00+02:00") == datetime(2025, 3, 30, 12, tzinfo=UTC)
    local = datetime(2025, 3, 30, 14, 0).astimezone()  # what "local time of this machine" means
    assert parse_time("2025-03-30T14:00") == local.astimezone(UTC)
    with pytest.raises(InvalidRestoreRequest) as e:
        parse_time("yesterday")
    assert e.value.exit_code == 2 and "ISO 8601" in str(e.value)


def _point(pid: str, seq: int, parent: str | None, minutes: int, level: str = "incremental"):
    from virtwarden.catalog.points import ArtifactView, PointView

    return PointView(id=pid, domain="web01", domain_uuid="u-1", host="local", storage="nfs", strategy="bitmap",
                     chain_id="c1", parent_id=parent, seq=seq, level=level, status="complete", reason=None,
                     consistency="crash", checkpoint=None, manifest_key=f"web01/c1/{pid}/manifest.json",
                     size_bytes=300, job_id=None,
                     created_at=datetime(2025, 3, 30, 12, minutes, tzinfo=UTC), completed_at=None,
                     artifacts=(ArtifactView("vda", f"{pid}/vda", 100, "x", 64 * MiB),
                                ArtifactView("vdb", f"{pid}/vdb", 200, "y", 32 * MiB)))


_SAVED_XML = """<domain type='kvm'><name>web01</name><uuid>u-1</uuid>
<os><type>hvm</type><loader type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
<nvram>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/srv/images/web01-vda.virtwarden-20250330T120000-abcd1234.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/data/web01-b.img'/>
<target dev='vdb'/></disk>
<interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/></interface>
<serial type='file'><source path='/var/log/web01.serial'/><target port='0'/></serial>
</devices></domain>"""


def _chain():
    """A full and two incrementals; vdb is raw, so it is stored whole in every point."""
    pts = [_point("p0", 0, None, 0, "full"), _point("p1", 1, "p0", 10), _point("p2", 2, "p1", 20)]
    manifests = [{"point_id": p.id, "domain": {"xml": _SAVED_XML},
                  "disks": [{"target": "vda", "mode": "full" if p.seq == 0 else "incremental", "key": f"{p.id}/vda",
                             "size_bytes": 100, "sha256": "x", "virtual_size": 64 * MiB},
                            {"target": "vdb", "mode": "full", "key": f"{p.id}/vdb", "size_bytes": 200,
                             "sha256": "y", "virtual_size": 32 * MiB}]} for p in pts]
    return pts, manifests


def test_plan_as_a_new_domain_reads_only_the_layers_needed_and_puts_images_beside_the_originals():
    from virtwarden.tasks.restore_plan import Destination, plan_restore

    pts, manifests = _chain()
    plan = plan_restore(pts, manifests, Destination.from_options(as_domain="web01-copy", start=True),
                        host="local", selected="the latest complete point")
    disks = {d.target: d for d in plan.disks}
    assert disks["vda"].layers == ("p0", "p1", "p2") and disks["vda"].read_bytes == 300
    assert disks["vdb"].layers == ("p2",) and disks["vdb"].read_bytes == 200  # raw: the newest full only
    assert plan.read_bytes == 500
    assert disks["vda"].path == "/srv/images/web01-copy-vda.qcow2"  # beside the tracker overlay's base
    assert disks["vdb"].path == "/data/web01-copy-vdb.qcow2"
    assert plan.serial_log == "/srv/images/web01-copy-serial.log"
    assert plan.define is not None and plan.define.action == "define" and plan.define.uuid is None
    out = plan.to_json()
    assert [c["id"] for c in out["chain"]] == ["p0", "p1", "p2"] and out["point"]["id"] == "p2"
    assert json.loads(json.dumps(out)) == out
    text = "\n".join(plan.describe())
    assert "web01-copy" in text and "a new random UUID" in text and "500 B" in text


def test_plan_in_place_sets_aside_the_tracker_overlay_with_the_disk_and_keeps_formats():
    from virtwarden.tasks.restore import RestoreRefused
    from virtwarden.tasks.restore_plan import Destination, LiveDisk, LiveDomain, plan_restore

    pts, manifests = _chain()
    tracker = "/srv/images/web01-vda.virtwarden-20250330T120000-abcd1234.qcow2"
    live = LiveDomain("web01", "u-1", "running", True, (
        LiveDisk("vda", "/srv/images/web01-vda.qcow2", "qcow2", "file", (tracker, "/srv/images/web01-vda.qcow2")),
        LiveDisk("vdb", "/data/web01-b.img", "raw", "file", ("/data/web01-b.img",)),
        LiveDisk("vdc", "/data/new.qcow2", "qcow2", "file", ("/data/new.qcow2",))))
    dest = Destination.from_options(in_place=True, discard_old=True)
    plan = plan_restore(pts, manifests, dest, host="local", selected="by id", live=live)
    disks = {d.target: d for d in plan.disks}
    assert (disks["vda"].path, disks["vda"].format) == ("/srv/images/web01-vda.qcow2", "qcow2")
    assert disks["vda"].replaces == (tracker, "/srv/images/web01-vda.qcow2")
    assert (disks["vdb"].path, disks["vdb"].format) == ("/data/web01-b.img", "raw")
    assert plan.define.action == "replace-disks" and plan.define.uuid == "u-1" and plan.define.update_definition
    assert any("vdc" in n for n in plan.notes)

    transient = LiveDomain("web01", "u-1", "running", False, live.disks)
    with pytest.raises(RestoreRefused, match="transient"):
        plan_restore(pts, manifests, dest, host="local", selected="by id", live=transient)
    lacking = LiveDomain("web01", "u-1", "running", True, live.disks[:1])
    with pytest.raises(RestoreRefused, match="has no disk vdb"):
        plan_restore(pts, manifests, dest, host="local", selected="by id", live=lacking)


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one"),
    ({"to_dir": "/r", "in_place": True}, "exactly one"),
    ({"to_dir": "/r", "start": True}, "--start"),
    ({"as_domain": "x", "discard_old": True}, "--discard-old"),
    ({"as_domain": "bad/name"}, "not a usable domain name"),
    ({"to_dir": "relative/dir"}, "absolute"),
])
def test_options_that_do_not_go_together_are_usage_errors(options, message):
    from virtwarden.tasks.restore import InvalidRestoreRequest
    from virtwarden.tasks.restore_plan import Destination

    with pytest.raises(InvalidRestoreRequest, match=message) as e:
        Destination.from_options(**options)
    assert e.value.exit_code == 2


def test_copy_gets_its_own_nvram_and_repoint_keeps_everything_else():
    from virtwarden.hypervisor.domxml import CopySpec, copy_domain, repoint_disks

    copy = ET.fromstring(copy_domain(_SAVED_XML, CopySpec(name="c", disks={"vda": "/x/c-vda.qcow2",
                                                                             "vdb": "/x/c-vdb.qcow2"})).xml)
    assert copy.find("os/nvram") is None and copy.find("os/loader") is not None
    assert copy.find("devices/interface/mac").get("address") != "52:54:00:11:22:33"

    same = ET.fromstring(repoint_disks(_SAVED_XML, {"vda": ("/srv/images/web01-vda.qcow2", "raw")}))
    vda = same.find("devices/disk")
    assert vda.find("source").get("file") == "/srv/images/web01-vda.qcow2"
    assert vda.find("driver").get("type") == "raw"
    assert same.findtext("name") == "web01" and same.findtext("uuid") == "u-1"
    assert same.find("os/nvram") is not None
    assert same.find("devices/interface/mac").get("address") == "52:54:00:11:22:33"


def test_next_backup_after_a_restore_in_place_is_a_full_that_says_why():
    from virtwarden.hypervisor.types import Disk, DomainInfo
    from virtwarden.tasks.backup import BackupRequest, plan_level

    head = _point("p2", 2, "p1", 20)
    dom = DomainInfo("web01", "u-1", "running", True, (Disk("vda", "/a", "qcow2", "file", 64 * MiB),
                                                       Disk("vdb", "/b", "raw", "file", 32 * MiB)), "")
    req = BackupRequest(domain="web01", storage="nfs")
    plan = plan_level(req, dom, head, {"cp"}, "domain was restored in place from point p1")
    assert plan.level == "full" and "restored in place" in plan.reason


def _files(tmp_path: Path, names: dict[str, bytes]) -> None:
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)


def _swap_plan(tmp_path: Path):
    from virtwarden.tasks.restore_plan import ChainEntry, DiskPlan, RestorePlan

    d = str(tmp_path)
    disks = (DiskPlan("vda", ("p",), 1, 1, f"{d}/vda.qcow2", "qcow2", (f"{d}/vda.T.qcow2", f"{d}/vda.qcow2")),
             DiskPlan("vdb", ("p",), 1, 1, f"{d}/vdb.img", "raw", (f"{d}/vdb.img",)))
    return RestorePlan("in-place", "web01", "u", "local", "nfs", "by id",
                       (ChainEntry("p", "full", datetime.now(UTC), 1),), disks)


def test_disk_swap_is_undone_completely_whatever_was_done(tmp_path):
    from virtwarden.tasks import disk_swap

    original = {"vda.T.qcow2": b"tracker", "vda.qcow2": b"base", "vdb.img": b"raw"}
    journal = disk_swap.SwapJournal(tmp_path / "scratch" / "job.json")

    def fresh():
        for p in list(tmp_path.iterdir()):
            if p.is_file():
                p.unlink()
        _files(tmp_path, original)
        swap = disk_swap.DiskSwap(_swap_plan(tmp_path), "job12345", token=7)
        swap.check()
        for target, temp in swap.temps.items():
            temp.write_bytes(b"restored-" + target.encode())
        return swap

    def names():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    swap = fresh()
    assert disk_swap.roll_back(swap.journal_fields()) == []  # nothing was moved: only the temporaries go
    assert names() == original
    swap = fresh()
    swap.apply()
    assert (tmp_path / "vda.qcow2").read_bytes() == b"restored-vda"
    assert (tmp_path / "vdb.img").read_bytes() == b"restored-vdb"
    assert sorted(swap.journal_fields()["aside"]) == sorted(str(p) for p in tmp_path.glob("*.before-restore-*"))
    assert disk_swap.roll_back(swap.journal_fields()) == []
    assert names() == original

    # A worker that died after some of the renames: the journal it wrote first puts
    # everything back, read by a process that knows nothing else.
    for done in range(len(swap.moves) + 1):
        swap = fresh()
        journal.record(disk_swap.SWAPPING, old_xml="<domain/>", **swap.journal_fields())
        for src, dst in swap.moves[:done]:
            os.rename(src, dst)
        again = disk_swap.SwapJournal(journal.path)
        assert again.state == disk_swap.SWAPPING and again.body["old_xml"] == "<domain/>"
        assert disk_swap.roll_back(again.body) == []
        assert names() == original, done
        again.forget()
        assert disk_swap.SwapJournal(journal.path).state is None


def test_a_swap_journal_says_the_last_state_recorded_and_nothing_half_written(tmp_path):
    from virtwarden.tasks import disk_swap

    path = tmp_path / "scratch" / "job-1.restore-swap.json"
    journal = disk_swap.SwapJournal(path)
    journal.record(disk_swap.STOPPING, domain="web01", was_running=True)
    journal.record(disk_swap.SWAPPING, was_running=False, moves=[["/a", "/b"]])
    journal.record(disk_swap.SWAPPED)
    read = disk_swap.SwapJournal(path)
    assert read.state == disk_swap.SWAPPED
    assert read.body == {"state": "swapped", "domain": "web01", "was_running": False, "moves": [["/a", "/b"]]}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file stays
    (path.parent / (path.name + ".tmp")).write_text('{"state": "stopp')  # a write cut short
    assert disk_swap.SwapJournal(path).state == disk_swap.SWAPPED


def test_temporary_images_of_every_attempt_of_a_job_are_found_and_only_those(tmp_path):
    from virtwarden.tasks import disk_swap

    image = tmp_path / "vda.qcow2"
    image.write_bytes(b"live")
    mine = [tmp_path / ".vda.qcow2.restoring-job12345.3", tmp_path / ".vda.qcow2.restoring-job12345"]
    other = tmp_path / ".vda.qcow2.restoring-other678.1"
    for p in [*mine, other]:
        p.write_bytes(b"partial")
    disk_swap.remove_temps([str(image)], "job12345-rest-of-the-id")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name, other.name])


# --- real guests ----------------------------------------------------------------------------

pytest_libvirt = pytest.mark.libvirt


def _backup(vw, domain: str, *extra: str) -> dict:
    r = vw.cli("backup", domain, "--target", "nfs", "--wait", "--json", *extra)
    assert r.code == 0, r.err
    return r.json()["result"]


def _policy(vw, tmp_path: Path, domain: str, strategy: str) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / f"{domain}.yaml").write_text(
        f"apiVersion: virtwarden/v1\nkind: Policy\nmetadata: {{name: {domain}}}\n"
        f"spec:\n  selector: {{domains: ['{domain}']}}\n  backup: {{target: nfs, strategy: {strategy}}}\n")
    vw.extra["policy_dir"] = str(policy_dir)


@pytest.fixture
def made_domains():
    """Names of domains a test expects restores to define; removed afterwards."""
    import libvirt

    names: list[str] = []
    yield names
    conn = libvirt.open("qemu:///system")
    try:
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            for cp in dom.listAllCheckpoints():
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    finally:
        conn.close()


def _domain_exists(name: str) -> bool:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return name in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def _with_interface(g, network: str) -> None:
    """Give a stopped test guest a NIC on ``network`` with a known MAC, so a copy's new MAC
    shows (a user-mode NIC would not do: a copy keeps interfaces on networks and bridges only)."""
    xml = g.dom.XMLDesc(0).replace(
        "</devices>", f"<interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='{network}'/>"
                      "<model type='virtio'/></interface></devices>")
    g.dom = g.conn.defineXML(xml)


def _restore_jobs(vw) -> list[dict]:
    return [j for j in vw.cli("jobs", "--json").json() if j["kind"].startswith("restore")]


@pytest_libvirt
@pytest.mark.parametrize("strategy", ["bitmap", "blockcommit"])
def test_restore_as_a_new_domain_boots_with_its_own_identity(vw, lan, guest_factory, tmp_path, strategy,
                                                             made_domains):
    g = guest_factory(disks=2, size_mib=32, boot_marker=MARKER, start=False)
    _with_interface(g, lan)
    g.dom.create()
    _policy(vw, tmp_path, g.name, strategy)
    vw.start_worker()
    g.write_random("vda", 1 * MiB, 2 * MiB)
    g.write("vdb", 0, MiB, pattern=0x71)
    assert _backup(vw, g.name)["level"] == "full"
    g.write("vdb", 4 * MiB, MiB, pattern=0x72)
    second = _backup(vw, g.name)
    assert second["level"] == "incremental"
    expected = {t: g.shadow_copy(t, tmp_path / f"p-{t}.raw") for t in ("vda", "vdb")}
    g.write("vda", 0, 512, pattern=0x00)  # the live disk no longer boots; the point still does

    copy = f"{g.name}-copy"
    made_domains.append(copy)
    r = vw.cli("restore", g.name, "--as-domain", copy, "--start", "--wait", "--json")
    assert r.code == 0, r.err
    result = r.json()["result"]
    assert result["point_id"] == second["point_id"] and result["domain"] == copy
    assert result["disks"] == {t: str(g.workdir / f"{copy}-{t}.qcow2") for t in ("vda", "vdb")}
    serial = g.workdir / f"{copy}-serial.log"
    assert result["serial_log"] == str(serial)

    import libvirt

    dom = libvirt.open("qemu:///system").lookupByName(copy)
    assert dom.isActive() and dom.UUIDString() == result["uuid"] != g.dom.UUIDString()
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert root.find("devices/interface/mac").get("address") != "52:54:00:aa:bb:cc"
    assert root.find("devices/interface/source").get("network") == lan
    sources = {d.find("target").get("dev"): d.find("source").get("file") for d in root.findall("devices/disk")}
    assert sources == result["disks"]
    wait_for(lambda: serial.exists() and MARKER in serial.read_bytes(), 30, "the restored copy to boot", poll=0.1)
    for t in ("vda", "vdb"):
        assert images_equal(result["disks"][t], expected[t], force_share=True), t
        assert os.stat(result["disks"][t]).st_mode & 0o777 == 0o600, t
    assert not list(g.workdir.glob(".virtwarden-restore-*")), "the staging directory is gone"
    assert g.dom.isActive(), "the original keeps running"


@pytest_libvirt
@pytest.mark.parametrize("strategy, discard, start", [
    ("bitmap", False, False), ("bitmap", True, True), ("blockcommit", False, True)])
def test_restore_in_place_then_boot(vw, guest_factory, tmp_path, strategy, discard, start):
    g = guest_factory(disks=2, size_mib=32, boot_marker=MARKER)
    _policy(vw, tmp_path, g.name, strategy)
    vw.start_worker()
    g.write_random("vda", 2 * MiB, MiB)
    g.write("vdb", 0, 2 * MiB, pattern=0x81)
    first = _backup(vw, g.name)
    g.write("vdb", 8 * MiB, MiB, pattern=0x82)
    point = _backup(vw, g.name)
    assert point["level"] == "incremental"
    expected = {t: g.shadow_copy(t, tmp_path / f"p-{t}.raw") for t in ("vda", "vdb")}
    g.write("vda", 0, 512, pattern=0x00)  # broken boot sector
    g.write("vdb", 0, 4 * MiB, pattern=0x99)
    broken = {t: g.shadow_copy(t, tmp_path / f"b-{t}.raw") for t in ("vda", "vdb")}
    # The guest printed its marker when it first booted; only a boot after the restore
    # may write it again (the running QEMU keeps writing to the unlinked file).
    g.serial_path.unlink()

    args = ["restore", g.name, "--in-place", "--point", point["point_id"], "--shutdown-timeout", "1",
            "--wait", "--json"] + (["--discard-old"] if discard else []) + (["--start"] if start else [])
    r = vw.cli(*args)
    assert r.code == 0, r.err
    result = r.json()["result"]
    assert result["point_id"] == point["point_id"] and result["stopped"] in ("shutdown", "destroyed")
    assert result["disks"] == {t: str(g.disk_path(t)) for t in ("vda", "vdb")}
    assert g.dom.isActive() == start
    for t in ("vda", "vdb"):
        assert images_equal(g.disk_path(t), expected[t], fmt_a="qcow2", force_share=start), t
    sources = {d.find("target").get("dev"): d.find("source").get("file")
               for d in ET.fromstring(g.dom.XMLDesc(0)).findall("devices/disk")}
    assert sources == result["disks"]  # a blockcommit disk is off its tracker overlay now
    aside = sorted(g.workdir.glob("*.before-restore-*"))
    if discard:
        assert aside == [] and len(result["discarded"]) >= 2 and result["set_aside"] == []
    else:
        assert sorted(result["set_aside"]) == [str(p) for p in aside]
        if strategy == "blockcommit":  # each disk's change-tracking overlay went aside with it
            assert len([p for p in aside if ".virtwarden-" in p.name]) == 2, aside
        for t in ("vda", "vdb"):  # the replaced images hold what the disks held before
            mine = [p for p in aside if p.name.startswith(f"{t}.qcow2.")]
            assert len(mine) == 1
            if strategy == "bitmap":
                assert images_equal(mine[0], broken[t], fmt_a="qcow2"), t
    assert not list(g.workdir.glob(".*restoring*")), "no temporary image is left"

    if not start:
        assert not g.serial_path.exists()
        g.dom.create()
    assert g.wait_for_serial(MARKER, 30), "the restored domain did not boot"

    names = [c.getName() for c in g.dom.listAllCheckpoints()]
    assert not any(first["point_id"][:8] in n or point["point_id"][:8] in n for n in names)
    after = _backup(vw, g.name)
    assert after["level"] == "full" and "restored in place" in after["reason"], after
    assert after["chain_id"] != first["chain_id"]
    out = tmp_path / "after"
    assert vw.cli("restore", g.name, "--to-dir", str(out), "--wait").code == 0
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", expected[t]), t


@pytest_libvirt
def test_at_a_time_between_two_points_picks_the_earlier(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x11)
    first = _backup(vw, g.name)
    expected = g.shadow_copy("vda", tmp_path / "first.raw")
    time.sleep(0.05)
    between_utc = datetime.now(UTC)
    between_local = datetime.now()  # naive: this machine's local time
    time.sleep(0.05)
    g.write("vda", 0, MiB, pattern=0x22)
    second = _backup(vw, g.name)

    plan = vw.cli("restore", g.name, "--at", between_local.isoformat(), "--to-dir", str(tmp_path / "x"),
                  "--dry-run", "--json")
    assert plan.code == 0, plan.err
    assert plan.json()["point"]["id"] == first["point_id"]
    assert "at or before" in plan.json()["selected"]
    out = tmp_path / "at"
    r = vw.cli("restore", g.name, "--at", between_utc.isoformat().replace("+00:00", "Z"), "--to-dir", str(out),
               "--wait", "--json")
    assert r.code == 0, r.err
    assert r.json()["result"]["point_id"] == first["point_id"]
    assert images_equal(out / "vda.qcow2", expected)
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    plan = vw.cli("restore", g.name, "--at", later, "--to-dir", str(tmp_path / "y"), "--dry-run", "--json")
    assert plan.json()["point"]["id"] == second["point_id"]


@pytest_libvirt
def test_dry_run_shows_the_plan_and_changes_nothing(vw, guest_factory, tmp_path):
    g = guest_factory(disks=2, size_mib=16)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x31)
    first = _backup(vw, g.name)
    g.write("vdb", MiB, MiB, pattern=0x32)
    second = _backup(vw, g.name)
    points = vw.cli("backups", g.name, "--json").json()
    before = {t: g.shadow_copy(t, tmp_path / f"now-{t}.raw") for t in ("vda", "vdb")}
    jobs_before = vw.cli("jobs", "--json").json()
    copy, out = f"{g.name}-dry", tmp_path / "never"

    runs = {
        "to-dir": ["--to-dir", str(out)],
        "as-domain": ["--as-domain", copy, "--start"],
        "in-place": ["--in-place", "--discard-old", "--start"],
    }
    for mode, extra in runs.items():
        r = vw.cli("restore", g.name, *extra, "--dry-run", "--json")
        assert r.code == 0, (mode, r.err)
        plan = r.json()
        assert plan["dry_run"] and plan["mode"] == mode
        assert [c["id"] for c in plan["chain"]] == [first["point_id"], second["point_id"]]
        assert [c["level"] for c in plan["chain"]] == ["full", "incremental"]
        assert all(c["created_at"] for c in plan["chain"])
        assert plan["read_bytes"] == sum(p["size_bytes"] for p in points)  # qcow2 disks: every layer
        paths = {d["target"]: d["path"] for d in plan["disks"]}
        if mode == "to-dir":
            assert paths == {t: str(out / f"{t}.qcow2") for t in ("vda", "vdb")}
        elif mode == "as-domain":
            assert paths == {t: str(g.workdir / f"{copy}-{t}.qcow2") for t in ("vda", "vdb")}
            assert plan["domain_definition"]["name"] == copy and plan["domain_definition"]["action"] == "define"
        else:
            assert paths == {t: str(g.disk_path(t)) for t in ("vda", "vdb")}
            d = plan["domain_definition"]
            assert (d["name"], d["uuid"], d["action"]) == (g.name, g.dom.UUIDString(), "replace-disks")
        human = vw.cli("restore", g.name, *extra, "--dry-run")
        assert human.code == 0 and "nothing was changed" in human.out and second["point_id"] in human.out

    book = vw.cli("runbook", "run", "restore-latest", "-p", f"domain={g.name}", "-p", f"as_domain={copy}",
                  "--dry-run", "--json")
    assert book.code == 0, book.err
    assert book.json()["steps"][0]["plan"]["point"]["id"] == second["point_id"]

    assert vw.cli("jobs", "--json").json() == jobs_before, "a dry run created a job"
    assert not out.exists() and not list(g.workdir.glob(f"{copy}*")) and not _domain_exists(copy)
    assert g.dom.isActive(), "the dry run of an in-place restore stopped the domain"
    assert not list(g.workdir.glob("*restor*"))
    g.dom.destroy()  # QEMU writes out what it cached, so the files can be compared
    for t in ("vda", "vdb"):
        assert images_equal(g.disk_path(t), before[t]), t


@pytest_libvirt
def test_refusals_say_why_and_change_nothing(vw, guest_factory, tmp_path, made_domains):
    g = guest_factory(disks=1, size_mib=16)
    other = guest_factory(disks=1, size_mib=16, start=False)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x41)
    point = _backup(vw, g.name)
    listed = vw.cli("backups", g.name, "--json").json()
    jobs_before = vw.cli("jobs", "--json").json()
    files_before = sorted(p.name for p in g.workdir.iterdir())
    copy = f"{g.name}-copy"
    made_domains += [copy, f"{g.name}-x"]  # only if a refusal failed to refuse
    (g.workdir / f"{copy}-vda.qcow2").write_bytes(b"someone else's")
    early = (datetime.fromisoformat(listed[0]["created_at"]) - timedelta(hours=1)).isoformat()

    cases = [
        (["--as-domain", other.name], 1, f"already has a domain named {other.name!r}"),
        (["--as-domain", copy], 1, "already exist"),
        (["--point", "no-such-point", "--as-domain", f"{g.name}-x"], 4, "no restore point 'no-such-point'"),
        (["--at", early, "--as-domain", f"{g.name}-x"], 4, "no complete restore point at or before"),
        (["--at", "last tuesday", "--to-dir", str(tmp_path / "r")], 2, "ISO 8601"),
        (["--to-dir", str(tmp_path / "r"), "--discard-old"], 2, "--discard-old goes with --in-place"),
    ]
    for extra, code, message in cases:
        for dry in ([], ["--dry-run"]):
            r = vw.cli("restore", g.name, *extra, *dry, "--wait")
            assert r.code == code, (extra, dry, r.code, r.err)
            assert message in r.err, (extra, r.err)
            assert "Traceback" not in r.err

    assert (g.workdir / f"{copy}-vda.qcow2").read_bytes() == b"someone else's"
    assert sorted(p.name for p in g.workdir.iterdir()) == sorted(files_before + [f"{copy}-vda.qcow2"])
    assert vw.cli("jobs", "--json").json() == jobs_before
    assert not _domain_exists(f"{g.name}-x") and not (tmp_path / "r").exists()
    assert not other.dom.isActive() and g.dom.isActive()
    assert listed[-1]["id"] == point["point_id"]

    import libvirt

    g.dom.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    for dry in ([], ["--dry-run"]):
        r = vw.cli("restore", g.name, "--in-place", *dry, "--wait")
        assert r.code == 1 and "has snapshots (before-upgrade)" in r.err, r.err
    assert g.dom.isActive() and [s.getName() for s in g.dom.listAllSnapshots()] == ["before-upgrade"]

    g.dom.destroy()
    # Gone: in place is impossible, and the message says what to do instead.
    g.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    r = vw.cli("restore", g.name, "--in-place", "--wait")
    assert r.code == 4 and f"--as-domain {g.name}" in r.err, r.err
    assert vw.cli("jobs", "--json").json() == jobs_before


@pytest_libvirt
def test_a_failed_restore_as_a_new_domain_leaves_nothing(vw, guest_factory, tmp_path, made_domains):
    """libvirt refuses the definition only after the images are written (here: the UUID
    the job was given is taken meanwhile); the images go again and no domain stays."""
    import libvirt

    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x51)
    _backup(vw, g.name)
    for w in vw.workers:
        w.stop()
    vw.workers.clear()
    copy = f"{g.name}-copy"
    made_domains.append(copy)
    r = vw.cli("restore", g.name, "--as-domain", copy, "--json")
    assert r.code == 0, r.err
    job = r.json()
    squatter = guest_factory(disks=1, size_mib=16, start=False)
    xml = squatter.dom.XMLDesc(0)
    squatter.dom.undefine()
    root = ET.fromstring(xml)
    root.find("uuid").text = job["params"]["uuid"]
    squatter.dom = libvirt.open("qemu:///system").defineXML(ET.tostring(root, encoding="unicode"))

    vw.start_worker()
    done = wait_for(lambda: (lambda j: j if j["state"] in ("succeeded", "failed") else None)(
        vw.cli("job", job["id"], "--json").json()), 120, f"job {job['id']} to end", poll=0.25)
    assert done["state"] == "failed", done
    assert not _domain_exists(copy)
    assert not list(g.workdir.glob(f"*{copy}*")), sorted(p.name for p in g.workdir.iterdir())
    assert not list(g.workdir.glob(".virtwarden-restore-*")), sorted(p.name for p in g.workdir.iterdir())
    assert not list(vw.scratch.rglob("*.qcow2"))


@pytest_libvirt
def test_a_failed_restore_in_place_leaves_the_domain_as_it_was(vw, guest_factory, tmp_path):
    """A damaged artifact is found before the domain is touched: it keeps running on its
    own disks, and no restored or temporary image is left."""
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x61)
    point = _backup(vw, g.name)
    g.write("vda", 0, MiB, pattern=0x62)
    now = g.shadow_copy("vda", tmp_path / "now.raw")
    art = next(Path(vw.storage["nfs"]["path"]).rglob(f"{point['point_id']}/vda.qcow2"))
    with open(art, "r+b") as f:
        f.seek(art.stat().st_size // 2)
        f.write(b"\xff" * 16)
    r = vw.cli("restore", g.name, "--in-place", "--wait", "--shutdown-timeout", "1")
    assert r.code == 6 and "is corrupt: expected sha256" in r.err, r.err  # EXIT_STORAGE: ChecksumMismatch
    assert g.dom.isActive()
    g.dom.destroy()  # QEMU writes out what it cached, so the file can be compared
    assert images_equal(g.disk_path("vda"), now)
    assert sorted(p.name for p in g.workdir.iterdir() if "restor" in p.name) == []


@pytest_libvirt
def test_restore_in_place_of_a_managed_saved_domain_boots_afresh(vw, guest_factory, tmp_path):
    """Memory saved with ``virsh managedsave`` belongs to the old disks: resuming it over
    restored ones would corrupt them, so it is discarded and the domain boots afresh."""
    g = guest_factory(disks=1, size_mib=16, boot_marker=MARKER)
    vw.start_worker()
    g.write("vda", MiB, MiB, pattern=0x91)
    point = _backup(vw, g.name)
    expected = g.shadow_copy("vda", tmp_path / "p.raw")
    g.write("vda", MiB, MiB, pattern=0x92)
    g.dom.managedSave(0)
    plan = vw.cli("restore", g.name, "--in-place", "--dry-run", "--json")
    assert plan.code == 0, plan.err
    assert any("managed save" in n for n in plan.json()["notes"])

    r = vw.cli("restore", g.name, "--in-place", "--wait", "--json")
    assert r.code == 0, r.err
    assert r.json()["result"]["stopped"] == "was-off" and r.json()["result"]["point_id"] == point["point_id"]
    assert not g.dom.hasManagedSaveImage(0)
    assert images_equal(g.disk_path("vda"), expected)
    g.serial_path.unlink(missing_ok=True)
    g.dom.create()
    assert g.wait_for_serial(MARKER, 30), "the domain resumed old memory instead of booting the restored disk"
