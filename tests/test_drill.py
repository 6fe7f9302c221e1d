"""Restore drills on real guests through a real worker: a good backup boots and passes,
a corrupted artifact and a disk that does not boot fail with the check that caught
them, a worker killed mid-drill is cleaned up after by the retry, and every drill
leaves nothing behind (no throwaway domain, no scratch files)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC
from pathlib import Path

import pytest
import yaml
from virtwarden.catalog import drills as drill_rows
from virtwarden.catalog import jobs as job_rows

from tests.guests import URI
from tests.harness import wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MARKER = "VW-DRILL-BOOTED"


def _policy(vw, tmp_path: Path, domain: str, **drill) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    doc = {"apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "drilled"},
           "spec": {"selector": {"domains": [domain]}, "backup": {"target": "nfs"},
                    "drill": {"run_for": "2s", **drill}}}
    (pdir / "drilled.yaml").write_text(yaml.safe_dump(doc))
    vw.extra["policy_dir"] = str(pdir)


def _backup(vw, domain: str) -> dict:
    r = vw.cli("backup", domain, "--wait", "--json")
    assert r.code == 0, r.err
    return r.json()["result"]



def _drill_domains(conn) -> list[str]:
    return [d.name() for d in conn.listAllDomains() if d.name().startswith("virtwarden-drill-")]


def _assert_nothing_left(vw, conn, job_id: str) -> None:
    from virtwarden.tasks.drill import throwaway_name

    assert throwaway_name(job_id) not in _drill_domains(conn)
    left = list(vw.scratch.iterdir()) if vw.scratch.exists() else []
    assert not left, left
    assert drill_rows.get(vw.catalog(), job_id).cleaned_up


@pytest.fixture
def conn(libvirt_uri):
    import libvirt

    c = libvirt.open(URI)
    yield c
    c.close()


def test_a_good_backup_boots_and_passes(vw, guest_factory, tmp_path, conn):
    """run_for counts from the moment the marker showed: a one-second run_for passes
    although the BIOS takes longer than that to reach the boot sector."""
    g = guest_factory(disks=2, size_mib=64, boot_marker=MARKER.encode())
    g.write_random("vdb", 0, 4 * 1024 * 1024)
    _policy(vw, tmp_path, g.name, serial_marker=MARKER, run_for="1s")
    vw.start_worker()
    point = _backup(vw, g.name)["point_id"]

    r = vw.cli("drill", g.name, "--wait", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["state"] == "succeeded"
    assert out["params"]["point"] == point and out["params"]["run_for"] == 1.0
    drill = out["drill"]
    assert drill["state"] == "passed" and drill["point_id"] == point
    assert [(c["name"], c["ok"]) for c in drill["checks"]] == [
        ("checksums", True), ("restore", True), ("starts", True), ("stays-running", True), ("serial-marker", True)]
    assert drill["restore_seconds"] is not None and drill["boot_seconds"] is not None
    assert drill["checks"][3]["detail"] == "running for 1 s since it booted"
    assert out["result"]["checks"] == drill["checks"] and out["result"]["passed"] is True
    _assert_nothing_left(vw, conn, out["id"])
    assert g.dom.isActive()  # the original never noticed

    listed = vw.cli("drills", g.name, "--json")
    assert listed.code == 0, listed.err
    assert [(d["job_id"], d["state"], d["cleaned_up"]) for d in listed.json()] == [(out["id"], "passed", True)]
    text = vw.cli("drills")
    assert text.code == 0 and "passed" in text.out and "5 ok" in text.out


def test_a_corrupted_artifact_fails_the_checksum_check(vw, guest_factory, tmp_path, conn):
    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    g.write_random("vda", 1024 * 1024, 2 * 1024 * 1024)
    _policy(vw, tmp_path, g.name, serial_marker=MARKER)
    vw.start_worker()
    _backup(vw, g.name)
    stored = vw.cli("backups", g.name, "--json").json()[0]
    image = vw.root / "repository" / g.name / stored["chain_id"] / stored["id"] / "vda.qcow2"
    with open(image, "r+b") as f:  # flip bytes in the middle of the stored data
        f.seek(image.stat().st_size // 2)
        data = f.read(64)
        f.seek(-len(data), 1)
        f.write(bytes(b ^ 0xFF for b in data))

    r = vw.cli("drill", g.name, "--wait")
    assert r.code == 1, r.out + r.err
    assert "checksums" in r.out and "FAILED" in r.out and "drill failed" in r.err
    job = job_rows.recent(vw.catalog(), domain=g.name, limit=1)[0]
    assert job.kind == "drill" and job.state == "failed"
    drill = drill_rows.get(vw.catalog(), job.id)
    assert drill.state == "failed"
    assert [(c["name"], c["ok"]) for c in drill.checks] == [("checksums", False)]
    assert "checksum" in drill.checks[0]["detail"].lower() or "sha" in drill.checks[0]["detail"].lower()
    _assert_nothing_left(vw, conn, job.id)


def test_a_disk_that_does_not_boot_fails_the_marker_check(vw, guest_factory, tmp_path, conn):
    g = guest_factory(disks=1, size_mib=64)  # a zero boot sector: the BIOS finds nothing to boot
    _policy(vw, tmp_path, g.name, serial_marker=MARKER, boot_timeout="6s")
    vw.start_worker()
    _backup(vw, g.name)

    r = vw.cli("drill", g.name, "--wait", "--json")
    assert r.code == 1, r.err
    out = r.json()
    assert out["state"] == "failed" and "serial-marker" in out["error"] and "boot_timeout 6 s" in out["error"]
    drill = out["drill"]
    assert drill["state"] == "failed" and drill["boot_seconds"] is None
    assert [(c["name"], c["ok"]) for c in drill["checks"]] == [
        ("checksums", True), ("restore", True), ("starts", True), ("stays-running", True), ("serial-marker", False)]
    _assert_nothing_left(vw, conn, out["id"])
    assert vw.cli("drills", g.name, "--json").json()[0]["state"] == "failed"


def test_an_agent_channel_in_the_saved_xml_makes_the_agent_answer_a_check(vw, guest_factory, tmp_path, conn):
    """The boot sector runs no agent: a domain defined with an agent channel must fail
    the guest-agent check (a Linux guest with qemu-ga would pass it)."""
    import libvirt

    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    g.dom.attachDeviceFlags("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    _policy(vw, tmp_path, g.name, serial_marker=MARKER, boot_timeout="10s")
    vw.start_worker()
    _backup(vw, g.name)

    r = vw.cli("drill", g.name, "--wait", "--json")
    assert r.code == 1, r.err
    checks = {c["name"]: c for c in r.json()["drill"]["checks"]}
    assert checks["serial-marker"]["ok"] and checks["stays-running"]["ok"], checks
    assert not checks["guest-agent"]["ok"] and "agent channel" in checks["guest-agent"]["detail"]
    _assert_nothing_left(vw, conn, r.json()["id"])


def test_the_agent_of_a_restored_linux_guest_answers(vw, agent_guest_factory, tmp_path, conn):
    """A real Linux guest running qemu-guest-agent: its restored copy boots from the
    backed-up disk and its agent answers inside the throwaway domain."""
    g = agent_guest_factory()
    g.check_sh("echo drilled > /mnt/proof && sync")
    _policy(vw, tmp_path, g.name, expect_agent=True)
    vw.start_worker()
    _backup(vw, g.name)

    r = vw.cli("drill", g.name, "--wait", "--json", timeout=600)
    assert r.code == 0, r.err + r.out
    checks = {c["name"]: c for c in r.json()["drill"]["checks"]}
    assert checks["guest-agent"]["ok"] and checks["stays-running"]["ok"], checks
    assert r.json()["drill"]["state"] == "passed"
    _assert_nothing_left(vw, conn, r.json()["id"])
    assert g.answers()  # the original still runs its own agent


def test_a_worker_killed_mid_drill_leaves_nothing_after_the_retry(vw, guest_factory, tmp_path, conn):
    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    _policy(vw, tmp_path, g.name, serial_marker=MARKER)  # the kill comes at once
    first = vw.start_worker()
    _backup(vw, g.name)
    cat = vw.catalog()

    r = vw.cli("drill", g.name, "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]

    def started() -> bool:
        row = drill_rows.find(cat, job_id)
        return bool(row and any(c["name"] == "starts" and c["ok"] for c in row.checks))

    wait_for(started, 120, "the throwaway domain to start")
    from virtwarden.tasks.drill import drill_dir, throwaway_name

    name = throwaway_name(job_id)
    first.kill()
    # Auto-destroy: libvirt powers the throwaway off when the dead worker's connection closes.
    wait_for(lambda: not conn.lookupByName(name).isActive(), 60, "the orphaned throwaway to be powered off")
    assert name in _drill_domains(conn) and drill_dir(vw.scratch, job_id).exists()  # leftovers, for now

    vw.start_worker()  # its reaper requeues the job; the new attempt removes the leftovers first
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 240, "the retried drill to finish")
    assert done.state == "succeeded", done.error
    assert done.attempts == 2
    drill = drill_rows.get(cat, job_id)
    assert drill.state == "passed" and [c["name"] for c in drill.checks].count("starts") == 1
    _assert_nothing_left(vw, conn, job_id)


def test_a_dead_drill_is_swept_by_the_next_one(vw, guest_factory, tmp_path, conn):
    """A drill whose job was given up (its worker died on the last attempt) leaves a
    domain and files that only a later drill can remove: the sweep does, and marks it."""
    from virtwarden.catalog.models import Job
    from virtwarden.hypervisor import domains
    from virtwarden.hypervisor.domxml import CopySpec, copy_domain
    from virtwarden.hypervisor.libvirt_host import LibvirtHost
    from virtwarden.tasks.drill import drill_dir, sweep, throwaway_name

    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    _policy(vw, tmp_path, g.name)
    vw.write_config()
    cat = vw.catalog()
    dead = job_rows.create(cat, kind="drill", domain=g.name, host="local", params={"domain": g.name})
    with cat.session() as s:  # as the reaper leaves a job given up after its last attempt
        s.get(Job, dead.id).state = job_rows.FAILED
    row = drill_rows.begin(cat, drill_id=dead.id, domain=g.name, host="local", point_id=None,
                           throwaway=throwaway_name(dead.id))
    leftover = drill_dir(vw.scratch, dead.id)
    (leftover / "disks").mkdir(parents=True)
    (leftover / "disks" / "vda.qcow2").write_bytes(b"x")
    foreign = vw.scratch / "drill-not-in-this-catalog"
    foreign.mkdir()
    with LibvirtHost("local", URI) as hv:
        spec = CopySpec(row.throwaway, disks={}, throwaway=True)
        domains.define(hv, copy_domain(g.xml(), spec).xml, row.throwaway)
        removed = sweep(hv, cat, vw.scratch)
    assert f"domain {row.throwaway}" in removed and str(leftover) in removed
    assert row.throwaway not in _drill_domains(conn) and not leftover.exists()
    assert foreign.exists()  # not ours: never touched
    after = drill_rows.get(cat, dead.id)
    assert after.state == "failed" and after.cleaned_up and "worker stopped" in after.error


def test_scheduled_and_cli_drills_get_the_policys_settings(vw, guest_factory, tmp_path):
    """The scheduler names only the domain and the policy, the CLI maybe not even that;
    the job's parameters carry the governing policy's drill settings all the same."""
    from datetime import datetime

    from virtwarden.policies.schedule import Slot

    from virtwarden import config
    from virtwarden.daemons.scheduler import Scheduler
    from virtwarden.submit.drill import drill_params

    g = guest_factory(disks=1, size_mib=64)
    _policy(vw, tmp_path, g.name, point="oldest", serial_marker=MARKER, expect_agent=True, network="isolated")
    vw.start_worker()
    first = _backup(vw, g.name)["point_id"]
    latest = _backup(vw, g.name)["point_id"]
    vw.workers[0].stop()  # the drills below are only queued
    cfg = config.load(str(vw.config_path))
    now = datetime.now(UTC)
    params = Scheduler(cfg, vw.catalog())._params(Slot("drilled", "drill", g.name, now, now, "local"))
    assert params == drill_params(cfg, vw.catalog(), g.name, policy="drilled")
    assert params == {"domain": g.name, "policy": "drilled", "point": first, "storage": "nfs", "run_for": 2.0,
                      "boot_timeout": 300.0, "serial_marker": MARKER, "expect_agent": True, "network": "isolated"}

    queued = vw.cli("drill", g.name, "--json")
    assert queued.code == 0, queued.err
    assert queued.json()["params"] == params and queued.json()["host"] == "local"
    assert vw.cli("drill", g.name, "--point", "latest", "--json").json()["params"]["point"] == latest
    r = vw.cli("drill", g.name, "--point", "nope")
    assert r.code == 4 and "nope" in r.err
    r = vw.cli("drill", g.name, "--policy", "nightly")
    assert r.code == 4 and "drilled" in r.err
    assert vw.cli("drill", "no-such-domain").code == 4


@pytest.mark.xdist_group("drill-network")  # every test that may remove virtwarden-drill shares one xdist worker
def test_an_isolated_network_drill(vw, guest_factory, tmp_path, conn):
    """network: isolated puts the copy's interfaces on virtwarden-drill, a network with
    no forward (created when absent), never on the original's network."""
    import libvirt
    from virtwarden.hypervisor import networks
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    had_network = networks.DRILL_NETWORK in conn.listNetworks() + conn.listDefinedNetworks()
    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    g.dom.attachDeviceFlags("<interface type='network'><source network='vw-production-lan'/>"
                            "<model type='virtio'/><rom enabled='no'/></interface>", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    _policy(vw, tmp_path, g.name, serial_marker=MARKER, network="isolated")
    vw.start_worker()
    _backup(vw, g.name)
    try:
        r = vw.cli("drill", g.name, "--wait", "--json")
        assert r.code == 0, r.err
        print("CHECKS", r.json()["drill"]["checks"])
        starts = next(c for c in r.json()["drill"]["checks"] if c["name"] == "starts")
        assert f"isolated network {networks.DRILL_NETWORK}" in starts["detail"]
        net = conn.networkLookupByName(networks.DRILL_NETWORK)
        assert "<forward" not in net.XMLDesc(0) and "<ip" not in net.XMLDesc(0)
        _assert_nothing_left(vw, conn, r.json()["id"])
    finally:
        if not had_network:
            with LibvirtHost("local", URI) as hv:
                networks.remove(hv, networks.DRILL_NETWORK)


# --- without libvirt: the throwaway's XML and the catalog rows ---------------------------------

ORIGINAL = """<domain type='kvm'><name>web01</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<os><type arch='x86_64' machine='pc'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
<nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram><boot dev='hd'/></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web01-data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web01.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/srv/install.iso'/><target dev='sda' bus='sata'/></disk>
<interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br-prod'/></interface>
<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>
<filesystem type='mount'><source dir='/srv/shared'/><target dir='shared'/></filesystem>
<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web01/org.qemu.guest_agent.0'/>
<target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>
<serial type='pty'><target port='0'/></serial>
</devices></domain>"""  # noqa: E501 - test input: wrapping would change the XML


def _throwaway(network: str | None = None) -> ET.Element:
    from virtwarden.hypervisor.domxml import CopySpec, copy_domain
    from virtwarden.hypervisor.throwaway import fixed_boot_order

    spec = CopySpec("virtwarden-drill-0123abcd", disks={"vda": "/scratch/vda.qcow2", "vdb": "/scratch/vdb.qcow2"},
                    drop_interfaces=network is None, network=network, serial_log="/scratch/serial.log",
                    throwaway=True)
    return ET.fromstring(fixed_boot_order(copy_domain(ORIGINAL, spec).xml))


def test_the_throwaway_shares_nothing_with_the_original():
    root = _throwaway()
    text = ET.tostring(root, encoding="unicode")
    assert root.findtext("name") == "virtwarden-drill-0123abcd" and "11111111" not in text
    assert sorted(s.get("file") for s in root.iter("source") if s.get("file")) == [
        "/scratch/vda.qcow2", "/scratch/vdb.qcow2"]  # no live image, no ISO
    for gone in ("interface", "hostdev", "filesystem"):
        assert root.find(f"devices/{gone}") is None, gone
    assert "/srv/" not in text and "web01_VARS" not in text and "domain-3-web01" not in text
    assert root.find("os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS.fd"
    graphics = root.find("devices/graphics")  # no port, no address: through libvirt only
    assert graphics.get("port") is None and [e.attrib for e in graphics] == [{"type": "none"}]
    serial = root.findall("devices/serial")
    assert len(serial) == 1 and serial[0].get("type") == "file"
    assert serial[0].find("source").get("path") == "/scratch/serial.log"


def test_the_throwaway_boots_its_first_disk_every_time():
    root = _throwaway()
    assert root.find("os/boot") is None
    boots = {d.find("target").get("dev"): d.find("boot") for d in root.findall("devices/disk")}
    assert boots["vda"].get("order") == "1" and boots["vdb"] is None


def test_an_isolated_drill_moves_every_interface_to_the_drill_network():
    iface = _throwaway(network="virtwarden-drill").find("devices/interface")
    assert iface.get("type") == "network" and iface.find("source").get("network") == "virtwarden-drill"
    assert iface.find("mac").get("address") != "52:54:00:aa:bb:cc"


def test_agent_channels_are_found_in_the_saved_xml():
    from virtwarden.hypervisor.throwaway import has_agent_channel

    assert has_agent_channel(ORIGINAL)
    assert not has_agent_channel("<domain><devices><channel type='spicevmc'>"
                                 "<target type='virtio' name='com.redhat.spice.0'/></channel></devices></domain>")


def test_an_attempt_that_lost_its_job_never_overwrites_the_next_attempt(tmp_path):
    from virtwarden.catalog.store import Catalog

    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    first = drill_rows.begin(cat, drill_id="j1", domain="web01", host="local", point_id="p", throwaway="t")
    second = drill_rows.begin(cat, drill_id="j1", domain="web01", host="local", point_id="p", throwaway="t")
    drill_rows.record(cat, first, checks=[{"name": "starts", "ok": False, "detail": "stale"}])
    drill_rows.finish(cat, first, passed=False, error="stale")
    drill_rows.record(cat, second, checks=[{"name": "starts", "ok": True, "detail": "fresh"}])
    now = drill_rows.get(cat, "j1")
    assert now.state == "running" and now.checks == [{"name": "starts", "ok": True, "detail": "fresh"}]
    drill_rows.finish(cat, second, passed=True)
    assert drill_rows.get(cat, "j1").state == "passed"
