"""A hostile domain XML, backed up from a real guest, never reaches libvirt again: real
libvirtd, a real guest that boots with it under TCG, a real worker.

The guest runs with raw QEMU arguments (``<qemu:commandline>``: a user-mode NIC that
reaches out through the host), a user-mode ``<interface>``, an nvdimm backed by a host
file, shared memory, a USB redirection on a TCP socket, TCP and UDP serial ports, a
9p-shared host directory and a VNC display on every interface with a password; its
definition for the next boot also has an rbd disk, a host PCI device and a fixed vsock
CID (which no guest here could boot with). A drill and a restore as a new domain of its
backup must run with none of it: checked in libvirt's live XML of the running copy
(read with the secure flag, so a password would show) and in the running QEMU's own
command line. A manifest tampered with after its backup is refused by its checksum;
one the catalog has no checksum for (made before manifests were checksummed) is rebuilt
from the allowlist like any other. Backups record no graphics password, a restored
``domain.xml`` holds none, and a restore in place keeps the domain's own.
"""
from __future__ import annotations

import json
import re
import secrets
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from sqlalchemy import update
from virtwarden.catalog import drills as drill_rows
from virtwarden.catalog import jobs as job_rows
from virtwarden.catalog.models import RestorePoint

from tests.guests import URI
from tests.harness import wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.xdist_group("drill-network"), pytest.mark.cli_in_process]
MARKER = "VW-HOSTILE-BOOTED"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VNC_PASSWORD = "s3cr3tVN"  # VNC passwords are at most 8 characters
EXIT_FAILED, EXIT_STORAGE = 1, 6
# What must never reach a copy, by the element libvirt shows it as.
HOSTILE_DEVICES = ("hostdev", "filesystem", "shmem", "redirdev", "vsock", "smartcard", "parallel")


@pytest.fixture
def conn(libvirt_uri):
    import libvirt

    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def drill_network(conn):
    """virtwarden-drill as the drills create it; removed afterwards when this test made it."""
    from virtwarden.hypervisor import networks
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    had = networks.DRILL_NETWORK in conn.listNetworks() + conn.listDefinedNetworks()
    yield networks.DRILL_NETWORK
    if not had:
        with LibvirtHost("local", URI) as hv:
            networks.remove(hv, networks.DRILL_NETWORK)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hostile:
    """A running marker guest whose definition holds every hostile part this host can
    boot, and more for its next boot."""

    def __init__(self, guest, lan: str, *, vsock: bool = True) -> None:
        import libvirt

        self.guest, self.lan = guest, lan
        self.shm = f"vwtest-shm-{secrets.token_hex(4)}"
        self.share = guest.workdir / "share"
        self.share.mkdir()
        self.nvdimm = guest.workdir / "nvdimm.img"
        with open(self.nvdimm, "wb") as f:
            f.truncate(128 << 20)
        self.ports = {"redir": _free_port(), "tcp": _free_port(), "udp": _free_port(socket.SOCK_DGRAM),
                      "udp-peer": _free_port(socket.SOCK_DGRAM)}
        xml = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"^<domain ([^>]*)>", rf"<domain \1 xmlns:qemu='{QEMU_NS}'>", xml)
        xml = xml.replace("<memory ", "<maxMemory slots='2' unit='MiB'>1024</maxMemory><memory ", 1)
        xml = xml.replace("</os>", "</os><features><acpi/></features>", 1)
        numa = "<numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa>"
        xml = xml.replace("</cpu>", numa + "</cpu>") if "</cpu>" in xml else xml.replace(
            "</features>", f"</features><cpu>{numa}</cpu>")
        xml = xml.replace("<controller type='usb' index='0' model='none'/>",
                          "<controller type='usb' index='0' model='qemu-xhci'/>")
        p = self.ports
        devices = (
            "<interface type='user'><mac address='52:54:00:de:ad:01'/><model type='e1000'/></interface>"
            f"<interface type='network'><mac address='52:54:00:de:ad:02'/><source network='{lan}'/>"
            "<model type='virtio'/></interface>"
            f"<memory model='nvdimm'><source><path>{self.nvdimm}</path></source>"
            "<target><size unit='MiB'>128</size><node>0</node></target></memory>"
            f"<shmem name='{self.shm}'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"
            f"<redirdev bus='usb' type='tcp'><source mode='bind' host='127.0.0.1' service='{p['redir']}'/></redirdev>"
            f"<serial type='tcp'><source mode='bind' host='127.0.0.1' service='{p['tcp']}'/><protocol type='raw'/>"
            "<target port='1'/></serial>"
            f"<serial type='udp'><source mode='bind' host='127.0.0.1' service='{p['udp']}'/>"
            f"<source mode='connect' host='127.0.0.1' service='{p['udp-peer']}'/><target port='2'/></serial>"
            f"<filesystem type='mount' accessmode='mapped'><source dir='{self.share}'/>"
            "<target dir='hostshare'/></filesystem>"
            f"<graphics type='vnc' autoport='yes' listen='0.0.0.0' passwd='{VNC_PASSWORD}'>"
            "<listen type='address' address='0.0.0.0'/></graphics>")
        xml = xml.replace("</devices>", devices + "</devices>")
        # slot 0x1e: clear of the slots libvirt assigns itself
        args = ["-netdev", "user,id=hostile0", "-device", "e1000,netdev=hostile0,bus=pci.0,addr=0x1e"]
        xml = xml.replace("</domain>", "<qemu:commandline>" + "".join(f"<qemu:arg value='{a}'/>" for a in args)
                          + "</qemu:commandline></domain>")
        guest.dom = guest.conn.defineXML(xml)
        guest.dom.create()
        assert guest.wait_for_serial(MARKER.encode(), 60), "the hostile original did not boot"
        # For its next boot: parts no guest here could start with, in the saved XML all the same.
        later = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                 "<source protocol='rbd' name='pool/vwtest'><host name='192.0.2.10' port='6789'/></source>"
                 "<target dev='vdb' bus='virtio'/></disk>"
                 "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
                 "<address domain='0x0000' bus='0x3f' slot='0x1f' function='0x7'/></source></hostdev>")
        if vsock:
            later += "<vsock model='virtio'><cid auto='no' address='4711'/></vsock>"
        pending = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        guest.dom = guest.conn.defineXML(pending.replace("</devices>", later + "</devices>"))

    def close(self) -> None:
        Path("/dev/shm", self.shm).unlink(missing_ok=True)


@pytest.fixture
def hostile(lan, guest_factory, request):
    """The hostile guest; ``@pytest.mark.parametrize("hostile", [{"vsock": False}], indirect=True)``
    leaves the vsock out of its next boot's definition."""
    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode(), start=False)
    h = Hostile(g, lan, **getattr(request, "param", {}))
    try:
        yield h
    finally:
        h.close()


def _policy(vw, tmp_path: Path, domain: str, **drill) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    doc = {"apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "hostile"},
           "spec": {"selector": {"domains": [domain]}, "backup": {"target": "nfs"},
                    "drill": {"run_for": "5s", "serial_marker": MARKER, **drill}}}
    (pdir / "hostile.yaml").write_text(yaml.safe_dump(doc))
    vw.extra["policy_dir"] = str(pdir)


def _backup(vw, domain: str) -> dict:
    r = vw.cli("backup", domain, "--wait", "--json")
    assert r.code == 0, r.err
    return r.json()["result"]


def _manifest(vw, domain: str, point_id: str) -> Path:
    found = list((vw.storage_path("nfs") / domain).glob(f"*/{point_id}/manifest.json"))
    assert len(found) == 1, found
    return found[0]


class Running:
    """What libvirt and the kernel say about a running copy: its live XML read with the
    secure flag, and its QEMU process's command line."""

    def __init__(self, conn, name: str) -> None:
        import libvirt

        dom = conn.lookupByName(name)
        self.xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        self.root = ET.fromstring(self.xml)
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        self.cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert dom.isActive() and "qemu-system" in self.cmdline

    def assert_nothing_hostile(self, hostile: Hostile) -> None:
        root, devices = self.root, self.root.find("devices")
        assert QEMU_NS not in self.xml and root.find(f"{{{QEMU_NS}}}commandline") is None
        for tag in HOSTILE_DEVICES:
            assert devices.find(tag) is None, tag
        assert [m.get("model") for m in devices.findall("memory")] == []
        assert [(s.get("type"), s.find("target").get("port")) for s in devices.findall("serial")] in (
            [("file", "0")], [("pty", "0")])
        assert {c.get("type") for c in devices.findall("console")} <= {"file", "pty"}
        assert [d.find("target").get("dev") for d in devices.findall("disk")] == ["vda"]  # no rbd disk
        assert all(i.get("type") == "network" for i in devices.findall("interface"))
        graphics = devices.findall("graphics")
        assert [(g.get("type"), g.get("port"), g.get("passwd"), [e.get("type") for e in g.findall("listen")])
                for g in graphics] == [("vnc", None, None, ["none"])]
        for text in (VNC_PASSWORD, "0.0.0.0", str(hostile.nvdimm), str(hostile.share), hostile.shm, "4711",
                     "192.0.2.10", *(str(p) for p in hostile.ports.values())):
            assert text not in self.xml, text
        # And QEMU itself was given none of it.
        for text in ("hostile0", "netdev user", "nvdimm", "ivshmem", "usb-redir", "9p", "vhost-vsock",
                     "udp", str(hostile.share), str(hostile.nvdimm), "0.0.0.0", VNC_PASSWORD,
                     *(str(p) for p in hostile.ports.values())):
            assert text not in self.cmdline, text
        assert "-vnc none" in self.cmdline or "-vnc" not in self.cmdline


def _named(dropped: list[str], *parts: str) -> None:
    text = "\n".join(dropped)
    for part in parts:
        assert part in text, (part, dropped)
    assert VNC_PASSWORD not in text


def _drill_while_running(vw, conn, domain: str) -> tuple[Running, object]:
    """Start a drill, read the running throwaway, wait for the drill's end."""
    from virtwarden.tasks.drill import throwaway_name

    r = vw.cli("drill", domain, "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    cat = vw.catalog()

    def started() -> bool:
        row = drill_rows.find(cat, job_id)
        if row and any(c["name"] == "starts" and not c["ok"] for c in row.checks):
            raise AssertionError(f"the throwaway did not start: {row.checks}")
        return bool(row and any(c["name"] == "starts" and c["ok"] for c in row.checks))

    wait_for(started, 180, "the throwaway domain to start")
    running = Running(conn, throwaway_name(job_id))
    job = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 240, "the drill to finish")
    return running, job


def test_a_drill_of_a_hostile_domain_runs_with_none_of_it(vw, hostile, tmp_path, conn, drill_network):
    g = hostile.guest
    _policy(vw, tmp_path, g.name, network="isolated")
    vw.start_worker()
    point = _backup(vw, g.name)["point_id"]
    saved = json.loads(_manifest(vw, g.name, point).read_text())["domain"]["xml"]
    for part in ("qemu:commandline", "nvdimm", "<shmem", "<redirdev", "type='udp'", "protocol='rbd'", "<hostdev",
                 "<vsock", "0.0.0.0"):
        assert part in saved, part  # the backup recorded the hostile XML as it is ...
    assert "passwd" not in saved and VNC_PASSWORD not in saved  # ... but never a password

    running, job = _drill_while_running(vw, conn, g.name)
    assert job.state == "succeeded", job.error
    running.assert_nothing_hostile(hostile)
    ifaces = running.root.findall("devices/interface")
    assert [i.find("source").get("network") for i in ifaces] == [drill_network] * 2  # the user NIC and the LAN one
    assert not {i.find("mac").get("address") for i in ifaces} & {"52:54:00:de:ad:01", "52:54:00:de:ad:02"}
    drill = drill_rows.get(vw.catalog(), job.id)
    assert drill.state == "passed" and [c["name"] for c in drill.checks if c["ok"]] == [
        "checksums", "restore", "starts", "stays-running", "serial-marker"]
    starts = next(c for c in drill.checks if c["name"] == "starts")
    assert "left out of the saved XML: disk vdb (network rbd pool/vwtest), <filesystem" in starts["detail"]
    _named(job.result["left_out_of_xml"], "<qemu:commandline>", "<memory model='nvdimm'> backed by",
           f"<shmem name='{hostile.shm}'>", "<redirdev type='tcp'", "<serial type='tcp'>", "<serial type='udp'>",
           "<filesystem type='mount'>", "disk vdb (network rbd pool/vwtest)", "<hostdev", "<vsock",
           "graphics vnc listen 0.0.0.0:")  # no password: the backup recorded none
    assert drill.cleaned_up and g.dom.isActive()


# A new domain keeps a vsock device, with an automatic CID (tests/test_xml_allowlist.py),
# and this host has no /dev/vhost-vsock to start one.
@pytest.mark.parametrize("hostile", [{"vsock": False}], indirect=True)
def test_a_new_domain_restored_from_a_hostile_domain_runs_with_none_of_it(vw, hostile, tmp_path, conn):
    g = hostile.guest
    _policy(vw, tmp_path, g.name)
    vw.start_worker()
    _backup(vw, g.name)
    copy = f"{g.name}-copy"
    try:
        r = vw.cli("restore", g.name, "--as-domain", copy, "--start", "--wait", "--json")
        assert r.code == 0, r.err
        result = r.json()["result"]
        running = Running(conn, copy)
        running.assert_nothing_hostile(hostile)
        ifaces = running.root.findall("devices/interface")  # a working clone: its LAN interface stays
        assert [(i.find("source").get("network"), i.find("model").get("type")) for i in ifaces] == [
            (hostile.lan, "virtio")]
        assert ifaces[0].find("mac").get("address") not in ("52:54:00:de:ad:01", "52:54:00:de:ad:02")
        assert running.root.find("devices/disk/source").get("file") == result["disks"]["vda"]
        _named(result["left_out_of_xml"], "<qemu:commandline>", "interface type='user'", "<memory model='nvdimm'>",
               "<shmem", "<redirdev", "<serial type='tcp'>", "<serial type='udp'>", "<filesystem",
               "disk vdb (network rbd pool/vwtest)", "<hostdev",
               "graphics vnc listen 0.0.0.0:")  # no password: the backup recorded none
        serial = Path(result["serial_log"])
        wait_for(lambda: serial.exists() and MARKER.encode() in serial.read_bytes(), 60, "the copy to boot")
    finally:
        from virtwarden.hypervisor import domains
        from virtwarden.hypervisor.libvirt_host import LibvirtHost

        with LibvirtHost("local", URI) as hv:
            domains.remove(hv, copy)
    assert g.dom.isActive()


def _tamper(path: Path) -> None:
    """Add raw QEMU arguments (a user-mode NIC) to a manifest's saved XML."""
    data = json.loads(path.read_text())
    xml = data["domain"]["xml"]
    xml = re.sub(r"^<domain ([^>]*)>", rf"<domain \1 xmlns:qemu='{QEMU_NS}'>", xml)
    data["domain"]["xml"] = xml.replace("</domain>", "<qemu:commandline><qemu:arg value='-netdev'/>"
                                        "<qemu:arg value='user,id=hostile0'/><qemu:arg value='-device'/>"
                                        "<qemu:arg value='e1000,netdev=hostile0,bus=pci.0,addr=0x1e'/>"
                                        "</qemu:commandline></domain>")
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_a_tampered_saved_xml_is_refused_by_its_checksum_or_rebuilt(vw, guest_factory, tmp_path, conn):
    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode())
    _policy(vw, tmp_path, g.name)
    vw.start_worker()
    point = _backup(vw, g.name)["point_id"]
    manifest = _manifest(vw, g.name, point)
    _tamper(manifest)
    key = str(manifest.relative_to(vw.storage_path("nfs")))

    drill = vw.cli("drill", g.name, "--wait")
    assert drill.code == EXIT_FAILED and "checksums" in drill.out, drill.out + drill.err
    assert f"manifest {key} is not the one the catalog recorded" in drill.out
    copy = f"{g.name}-copy"
    restore = vw.cli("restore", g.name, "--as-domain", copy, "--start", "--wait")
    assert restore.code == EXIT_STORAGE and "not the one the catalog recorded" in restore.err, restore.err
    jobs = job_rows.recent(vw.catalog(), domain=g.name)
    assert [j.kind for j in jobs] == ["drill", "backup"]  # the restore was refused before it became a job
    job = jobs[0]
    assert drill_rows.get(vw.catalog(), job.id).cleaned_up
    names = {d.name() for d in conn.listAllDomains()}  # other tests' domains come and go: look for ours
    assert copy not in names and drill_rows.get(vw.catalog(), job.id).throwaway not in names  # nothing defined
    assert not list(g.workdir.glob(f"{copy}*")) and not list(vw.scratch.glob("*"))  # nothing written

    # A point made before manifests were checksummed has no record to compare with: its
    # XML is trusted no more than any other, and rebuilt from the allowlist.
    with vw.catalog().session() as s:
        s.execute(update(RestorePoint).where(RestorePoint.id == point).values(manifest_sha256=None))
    running, job = _drill_while_running(vw, conn, g.name)
    assert job.state == "succeeded", job.error
    assert QEMU_NS not in running.xml and "hostile0" not in running.cmdline
    _named(job.result["left_out_of_xml"], "<qemu:commandline>")


def test_backups_keep_no_graphics_password_and_a_restore_in_place_keeps_the_domains_own(vw, guest_factory,
                                                                                       tmp_path):
    import libvirt

    g = guest_factory(disks=1, size_mib=64, boot_marker=MARKER.encode(), start=False)
    g.dom = g.conn.defineXML(g.dom.XMLDesc(0).replace(
        "</devices>", f"<graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='{VNC_PASSWORD}'/></devices>"))
    g.dom.create()
    _policy(vw, tmp_path, g.name)
    vw.start_worker()
    point = _backup(vw, g.name)["point_id"]
    stored = _manifest(vw, g.name, point).read_text()
    assert "<graphics type='vnc'" in stored and VNC_PASSWORD not in stored and "passwd" not in stored

    out = tmp_path / "restored"
    r = vw.cli("restore", g.name, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    documented = (out / "domain.xml").read_text()
    assert "<graphics type='vnc'" in documented and "passwd" not in documented

    r = vw.cli("restore", g.name, "--in-place", "--point", point, "--shutdown-timeout", "1", "--start", "--wait",
               "--json")
    assert r.code == 0, r.err
    secure = g.conn.lookupByName(g.name).XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert f"passwd='{VNC_PASSWORD}'" in secure  # the domain's own password, from libvirt, not from the backup
    leftover = list(vw.scratch.glob("*.restore-swap.json"))
    assert all(VNC_PASSWORD not in p.read_text() for p in leftover)
