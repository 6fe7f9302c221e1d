"""Rebuilding a domain XML from an allowlist: pure ElementTree, no libvirt.

The domain XML saved with a restore point comes from storage, and storage is not
trusted: whoever can write to the repository (or had a hostile domain backed up) writes
that XML. A restore as a new domain and a restore drill define a domain from it, as
root, on a production host. So the copy is not the saved XML with some devices deleted:
it is a new document into which only what a restored domain needs is carried over, each
element and attribute on a list, each value that names something on the host checked or
replaced. Whatever is not on the list is left out and named in ``Rebuilt.dropped``.

Carried over: memory and vCPU sizing and tuning, ``cpu``, ``features``, ``clock``,
``pm``, the ``on_*`` actions, SMBIOS ``sysinfo``; ``os`` with firmware, kernel and
initrd only from system directories (``FIRMWARE_DIRS``) or files every local user may
read anyway (``public_boot_files``), and never the original's UEFI variable store; and
the devices: the restored disks (file images we wrote, nothing else), empty CD-ROM and
floppy drives, controllers, interfaces (see ``CopySpec``), pty serial ports and
consoles, guest-agent style virtio channels on sockets libvirt places itself, input
devices, VNC or SPICE reachable through libvirt only (no listen address, no password),
video, an RNG on ``/dev/urandom``, memory balloon, watchdog, panic notifier, IOMMU, an
emulated TPM with fresh state, plain DIMMs and virtio-mem, and (new domains only) vsock
with an automatic CID.

Left out, among everything else: any element or attribute in another XML namespace
(``<qemu:commandline>``, ``<qemu:override>``: raw QEMU arguments, e.g. a user-mode NIC
that reaches out through the host), ``<emulator>`` (libvirt picks its own binary),
``<hostdev>``, ``<filesystem>``, ``<shmem>``, ``<redirdev>``, ``<smartcard>``,
``<parallel>``, sound, character devices on the network (tcp, udp, telnet...), host
files or devices, ``<memory model='nvdimm'>`` and ``virtio-pmem`` (a file on the host
mapped into the guest), fixed vsock CIDs (a drill's copy has no vsock at all), disks
that were not restored (network disks such as rbd or iSCSI, block devices, other
images), ``<seclabel>`` overrides (libvirt's default confinement applies),
``<metadata>``, fw_cfg entries, lock-manager leases.

A document libvirt would never write (a DOCTYPE, another root element, a domain type
other than kvm or qemu, a non-``hvm`` OS) is refused with ``VirtwardenError``.
"""
from __future__ import annotations

import os
import posixpath
import re
import secrets
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtwarden.errors import VirtwardenError

if TYPE_CHECKING:  # domxml imports this module
    from virtwarden.hypervisor.domxml import CopySpec

# The locally administered range libvirt itself uses for generated MACs (52:54:00 is
# QEMU's); a copy gets a random address in it.
MAC_PREFIX = "52:54:00"
# Where firmware, kernels and initrds may come from: system directories only, so that
# a saved XML cannot make QEMU read a host file into the guest (``<kernel>/etc/shadow``).
FIRMWARE_DIRS = ("/usr/share/", "/usr/lib/", "/var/lib/libvirt/boot/")
AGENT_CHANNEL = "org.qemu.guest_agent.0"
VIRTWARDEN_NS = "https://virtwarden.dev/xmlns/1"  # policies.select.METADATA_NAMESPACE
_KNOWN_NS = {"http://libvirt.org/schemas/domain/qemu/1.0": "qemu"}

_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,63}$")
_DEV = re.compile(r"^[a-z]{2,4}[a-z0-9]{0,8}$")
_DISK_BUSES = {"virtio", "scsi", "sata", "ide", "usb", "fdc", "sd", "nvme"}
_ON_ACTIONS = {"destroy", "restart", "preserve", "rename-restart", "coredump-destroy", "coredump-restart"}
_WATCHDOG_ACTIONS = {"reset", "shutdown", "poweroff", "pause", "none", "inject-nmi"}


def random_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class Node:
    """What one element may carry: ``attrs`` (None: any attribute), ``children`` (tag
    -> Node; None: the whole subtree, for elements whose schema names nothing on the
    host), ``text``. Another namespace is never carried, whatever the node says."""

    attrs: frozenset[str] | None = frozenset()
    children: Mapping[str, Node] | None = field(default_factory=dict)
    text: bool = False


def _n(*attrs: str, text: bool = False, **children: Node) -> Node:
    return Node(frozenset(attrs), children, text)


SUBTREE = Node(None, None, True)  # reviewed: no paths, sockets, devices or commands inside
ADDRESS = Node(None, {}, False)  # <address type='pci' .../>, <address type='drive' .../>, ...
BOOT = _n("order")

# Top level: tag -> Node. Special elements (os, devices, ...) have handlers below.
_TOP: dict[str, Node] = {
    "memory": _n("unit", "dumpCore", text=True),
    "currentMemory": _n("unit", text=True),
    "maxMemory": _n("unit", "slots", text=True),
    "memoryBacking": _n(hugepages=SUBTREE, nosharepages=_n(), locked=_n(), source=_n("type"), access=_n("mode"),
                        allocation=_n("mode", "threads"), discard=_n()),  # file: in libvirt's own directory
    "memtune": SUBTREE,
    "vcpu": _n("placement", "cpuset", "current", text=True),
    "vcpus": SUBTREE,
    "iothreads": _n(text=True),
    "iothreadids": SUBTREE,
    "cputune": Node(frozenset(), {t: SUBTREE for t in (
        "vcpupin", "emulatorpin", "iothreadpin", "shares", "period", "quota", "global_period", "global_quota",
        "emulator_period", "emulator_quota", "iothread_period", "iothread_quota", "vcpusched", "iothreadsched",
        "emulatorsched")}),
    "numatune": SUBTREE,
    "blkiotune": _n(weight=_n(text=True)),
    "features": Node(frozenset(), {t: SUBTREE for t in (
        "acpi", "apic", "pae", "hap", "viridian", "privnet", "hyperv", "kvm", "pvspinlock", "pmu", "vmport", "gic",
        "smm", "ioapic", "hpt", "vmcoreinfo", "htm", "nested-hv", "msrs", "ccf-assist", "cfpc", "sbbc", "ibs", "tcg",
        "async-teardown", "ras", "ps2")}),
    "cpu": Node(None, {t: SUBTREE for t in ("model", "vendor", "topology", "feature", "numa", "cache",
                                             "maxphysaddr")}),
    "clock": Node(None, {"timer": SUBTREE}),
    "pm": Node(frozenset(), {"suspend-to-mem": _n("enabled"), "suspend-to-disk": _n("enabled")}),
}
# Replaced by the copy's own, or run-time details with no effect on the copy: left out
# without a word.
_SILENT_TOP = {"name", "uuid", "title", "description", "genid"}
_ON = ("on_poweroff", "on_reboot", "on_crash")

_DISK_DRIVER = frozenset({"cache", "error_policy", "rerror_policy", "io", "ioeventfd", "event_idx",
                          "copy_on_read", "discard", "detect_zeroes", "iothread", "queues", "queue_size"})
_DISK_CHILDREN = {"boot": BOOT, "address": ADDRESS, "serial": _n(text=True), "wwn": _n(text=True),
                  "vendor": _n(text=True), "product": _n(text=True), "blockio": Node(None, {}),
                  "geometry": Node(None, {}), "iotune": SUBTREE, "readonly": _n()}
_DISK_REPLACED = {"source", "driver", "target", "backingStore", "mirror", "alias"}  # rebuilt, or run-time state
_NIC_DRIVER = Node(frozenset({"name", "txmode", "ioeventfd", "event_idx", "queues", "rx_queue_size",
                              "tx_queue_size", "iommu", "ats", "packed", "page_per_vq"}),
                   {"host": Node(None, {}), "guest": Node(None, {})})
_NIC_ISOLATED = {"model": _n("type"), "driver": _NIC_DRIVER, "address": ADDRESS, "boot": BOOT, "mtu": _n("size"),
                 "link": _n("state")}
_NIC_KEPT = {**_NIC_ISOLATED, "vlan": SUBTREE, "bandwidth": SUBTREE, "filterref": SUBTREE, "tune": SUBTREE,
             "coalesce": SUBTREE, "acpi": _n("index"), "port": _n("isolated")}
_NIC_REPLACED = {"mac", "source", "target", "virtualport", "alias"}  # rebuilt, or run-time names
_CHR_TARGET = Node(None, {"model": _n("name")})

# Device tags copied with their node; the others have handlers or are left out.
_DEVICES: dict[str, Node] = {
    "controller": SUBTREE,
    "memballoon": Node(frozenset({"model", "autodeflate", "freePageReporting"}),
                       {"stats": _n("period"), "address": ADDRESS, "driver": Node(None, {})}),
    "panic": Node(frozenset({"model"}), {"address": ADDRESS}),
    "iommu": Node(frozenset({"model"}), {"driver": Node(None, {})}),
    "hub": Node(frozenset({"type"}), {"address": ADDRESS}),
}


@dataclass(frozen=True)
class Rebuilt:
    """The rebuilt XML and, in document order, what of the saved XML it left out and why."""

    xml: str
    dropped: tuple[str, ...]


def parse_untrusted(xml: str) -> ET.Element:
    """The root of a domain XML from storage; a DOCTYPE (entities) or another root is
    refused before anything else looks at it."""
    if re.search(r"<!(DOCTYPE|ENTITY)", xml, re.I):
        raise VirtwardenError("the saved domain XML declares a DOCTYPE or entities, which libvirt never writes; "
                              "refusing it")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise VirtwardenError(f"the saved domain XML cannot be parsed: {e}") from e
    if root.tag != "domain":
        raise VirtwardenError(f"the saved domain XML's root is <{_name(root.tag)}>, not <domain>")
    return root


def rebuild(root: ET.Element, spec: CopySpec) -> Rebuilt:
    """A new domain document from ``root`` (see the module docstring), named and
    identified by ``spec``, its disks on ``spec.disks``, its interfaces as ``spec``
    says, its serial console in ``spec.serial_log`` when one is given."""
    return _Builder(root, spec).build()


class _Builder:
    def __init__(self, root: ET.Element, spec: CopySpec) -> None:
        self.root, self.spec = root, spec
        self.dropped: list[str] = []
        graphics = {g.get("type") for g in root.findall("devices/graphics")}
        self.spice = "spice" in graphics

    def drop(self, what: str, why: str) -> None:
        self.dropped.append(f"{what}: {why}")

    # --- the document -----------------------------------------------------------------
    def build(self) -> Rebuilt:
        src, spec = self.root, self.spec
        kind = src.get("type")
        if kind not in ("kvm", "qemu"):
            raise VirtwardenError(f"the saved domain XML is of type {kind!r}; only kvm and qemu domains can be "
                                  "restored as a domain or drilled")
        out = ET.Element("domain", {"type": kind})
        ET.SubElement(out, "name").text = spec.name
        ET.SubElement(out, "uuid").text = spec.uuid
        if src.find("genid") is not None:
            ET.SubElement(out, "genid")  # empty: libvirt gives the copy a new generation ID
        self._foreign_attrs(src, "domain")
        handlers: dict[str, Callable[[ET.Element], ET.Element | None]] = {
            "os": self._os, "devices": self._devices, "sysinfo": self._sysinfo, "seclabel": self._seclabel,
            "metadata": self._metadata, "resource": self._resource}
        seen_devices = False
        for child in src:
            tag = child.tag
            if self._foreign(child, ""):
                continue
            if tag in _SILENT_TOP:
                continue
            if tag in handlers:
                seen_devices = seen_devices or tag == "devices"
                el = handlers[tag](child)
            elif tag in _ON:
                el = self._on(child)
            elif tag in _TOP:
                el = self._copy(child, _TOP[tag], tag)
            else:
                self.drop(_label(child), "not on the list of what a copy keeps")
                continue
            if el is not None:
                out.append(el)
        if not seen_devices:
            raise VirtwardenError("the saved domain XML has no <devices>")
        return Rebuilt(ET.tostring(out, encoding="unicode"), tuple(self.dropped))

    # --- generic copy -----------------------------------------------------------------
    def _foreign(self, el: ET.Element, where: str) -> bool:
        if not el.tag.startswith("{"):
            return False
        self.drop(f"{where}<{_name(el.tag)}>", "another XML namespace: libvirt hands such elements to QEMU or "
                                               "other tools unchecked")
        return True

    def _foreign_attrs(self, el: ET.Element, where: str) -> None:
        for name in el.attrib:
            if name.startswith("{"):
                self.drop(f"{where} attribute {_name(name)}", "another XML namespace")

    def _copy(self, src: ET.Element, node: Node, path: str) -> ET.Element:
        attrs = {}
        for name, value in src.attrib.items():
            if name.startswith("{"):
                self.drop(f"{path} attribute {_name(name)}", "another XML namespace")
            elif node.attrs is None or name in node.attrs:
                attrs[name] = value
            else:
                self.drop(f"{path} attribute {name}={value!r}", "not on the list of what a copy keeps")
        out = ET.Element(src.tag, attrs)
        if node.text or node.children is None:
            out.text = src.text
        for child in src:
            if self._foreign(child, f"{path}/"):
                continue
            sub = SUBTREE if node.children is None else node.children.get(child.tag)
            if sub is None:
                if child.tag != "alias":
                    self.drop(f"{path}/{_label(child)}", "not on the list of what a copy keeps")
                continue
            copied = self._copy(child, sub, f"{path}/{child.tag}")
            copied.tail = None
            out.append(copied)
        return out

    # --- top level --------------------------------------------------------------------
    def _on(self, src: ET.Element) -> ET.Element | None:
        value = (src.text or "").strip()
        if value not in _ON_ACTIONS:
            self.drop(f"<{src.tag}>{value}</{src.tag}>", "not an action libvirt knows")
            return None
        el = ET.Element(src.tag)
        el.text = value
        return el

    def _os(self, src: ET.Element) -> ET.Element:
        out = ET.Element("os", {k: v for k, v in src.attrib.items() if k == "firmware"})
        kernel = self._boot_file((src.findtext("kernel") or "").strip())
        for child in src:
            tag = child.tag
            if self._foreign(child, "os/"):
                continue
            if tag == "type":
                if (child.text or "").strip() != "hvm":
                    raise VirtwardenError(f"the saved domain XML boots {child.text!r}, not a full (hvm) virtual "
                                          "machine; it cannot be restored as a domain or drilled")
                self._keep(out, child, ("arch", "machine"), text=True)
            elif tag in ("loader", "kernel", "initrd", "dtb"):
                path = (child.text or "").strip()
                if path and not self._boot_file(path):
                    self.drop(f"os/{tag} {path}", _NOT_PUBLIC)
                    continue
                self._keep(out, child, ("readonly", "secure", "type", "format", "stateless"), text=True)
            elif tag == "cmdline":
                if kernel:  # the command line of a kernel left out means nothing
                    self._keep(out, child, (), text=True)
            elif tag == "nvram":
                self._nvram(out, child)
            elif tag in ("boot", "bootmenu", "smbios", "bios"):
                self._keep(out, child, ("dev", "enable", "timeout", "mode", "useserial", "rebootTimeout"))
            elif tag == "firmware":
                out.append(self._copy(child, Node(frozenset(), {"feature": _n("enabled", "name")}), "os/firmware"))
            else:
                self.drop(f"os/{_label(child)}", "not on the list of what a copy keeps")
        return out

    def _nvram(self, out: ET.Element, src: ET.Element) -> None:
        """The copy never uses the original's variable store: without a path libvirt
        creates a fresh one from the template (and deletes it with the domain)."""
        attrs = {}
        template = src.get("template")
        if template:
            if self._boot_file(template):
                attrs["template"] = template
            else:
                self.drop(f"os/nvram template {template}", _NOT_PUBLIC)
        for name in ("format", "templateFormat"):
            if src.get(name):
                attrs[name] = src.get(name, "")
        if src.find("source") is not None:
            self.drop("os/nvram/<source>", "a variable store elsewhere than libvirt's own")
        if attrs:
            ET.SubElement(out, "nvram", attrs)

    def _boot_file(self, path: str) -> bool:
        return _system_file(path) or path in self.spec.host_files

    def _keep(self, out: ET.Element, src: ET.Element, attrs: tuple[str, ...], *, text: bool = False) -> ET.Element:
        el = ET.SubElement(out, src.tag, {k: v for k, v in src.attrib.items() if k in attrs})
        if text:
            el.text = (src.text or "").strip() or None
        return el

    def _sysinfo(self, src: ET.Element) -> ET.Element | None:
        if src.get("type", "smbios") != "smbios":
            self.drop(_label(src), "fw_cfg entries can hand host files to the guest")
            return None
        return self._copy(src, Node(frozenset({"type"}), {t: SUBTREE for t in (
            "bios", "system", "baseBoard", "chassis", "processor", "memory", "oemStrings")}), "sysinfo")

    def _seclabel(self, src: ET.Element) -> None:
        if src.get("type", "dynamic") != "dynamic" or src.get("relabel") == "no" or src.find("baselabel") is not None:
            self.drop(_label(src), "the copy is confined by libvirt's default security labels")
        return None

    def _metadata(self, src: ET.Element) -> None:
        if src.find(f"{{{VIRTWARDEN_NS}}}*") is not None:
            self.drop("<metadata> with virtwarden labels", "policies select the copy by its own name")
        return None

    def _resource(self, src: ET.Element) -> None:
        partition = (src.findtext("partition") or "").strip()
        if partition not in ("", "/machine") or len(src) > (1 if src.find("partition") is not None else 0):
            self.drop(_label(src), "the copy runs in libvirt's default resource partition")
        return None

    # --- devices ----------------------------------------------------------------------
    def _devices(self, src: ET.Element) -> ET.Element:
        out = ET.Element("devices")
        handlers: dict[str, Callable[[ET.Element], ET.Element | None]] = {
            "disk": self._disk, "interface": self._interface, "graphics": self._graphics,
            "serial": self._serial, "console": self._console, "channel": self._channel, "input": self._input,
            "video": self._video, "rng": self._rng, "tpm": self._tpm, "vsock": self._vsock,
            "memory": self._memory, "watchdog": self._watchdog, "emulator": self._emulator,
            "audio": self._audio}
        restored: set[str] = set()
        for child in src:
            tag = child.tag
            if self._foreign(child, "devices/"):
                continue
            if tag in handlers:
                el = handlers[tag](child)
                if tag == "disk" and el is not None and el.get("device") == "disk":
                    restored.add(el.find("target").get("dev", ""))  # type: ignore[union-attr]
            elif tag in _DEVICES:
                el = self._copy(child, _DEVICES[tag], tag)
            else:
                self.drop(_label(child), _WHY.get(tag, "not on the list of devices a copy keeps"))
                continue
            if el is not None:
                el.tail = None
                out.append(el)
        missing = set(self.spec.disks) - restored
        if missing:
            raise VirtwardenError(f"the saved domain XML has no disk {', '.join(sorted(missing))}")
        if self.spec.serial_log:
            serial = ET.SubElement(out, "serial", {"type": "file"})
            ET.SubElement(serial, "source", {"path": self.spec.serial_log})
            ET.SubElement(serial, "target", {"port": "0"})
        return out

    def _disk(self, src: ET.Element) -> ET.Element | None:
        device = src.get("device", "disk")
        target = src.find("target")
        dev = target.get("dev", "") if target is not None else ""
        what = f"disk {dev or '(no target)'}"
        if target is None or not _DEV.match(dev):  # without a target, dev is "", which _DEV refuses
            self.drop(what, "no usable target name")
            return None
        if device == "disk":
            if dev not in self.spec.disks:
                self.drop(f"{what} ({_disk_source(src)})", "not restored from this point: the copy would "
                                                           "share it with the original")
                return None
            out = ET.Element("disk", {"type": "file", "device": "disk"})
            driver = src.find("driver")
            attrs = {k: v for k, v in (driver.attrib if driver is not None else {}).items() if k in _DISK_DRIVER}
            for k, v in (driver.attrib if driver is not None else {}).items():
                if k not in _DISK_DRIVER and k not in ("name", "type"):
                    self.drop(f"{what} driver attribute {_name(k)}={v!r}", "not on the list of what a copy keeps")
            ET.SubElement(out, "driver", {"name": "qemu", "type": "qcow2", **attrs})
            ET.SubElement(out, "source", {"file": self.spec.disks[dev]})
        elif device in ("cdrom", "floppy"):
            out = ET.Element("disk", {"type": "file", "device": device})
            ET.SubElement(out, "driver", {"name": "qemu", "type": "raw"})
            if (medium := src.find("source")) is not None and any(medium.attrib.values()):
                self.drop(f"{device} {dev} medium {_disk_source(src)}", "the copy's drive is empty")
        else:
            self.drop(f"{what} (device {device!r})", "a host device passed through")
            return None
        kept_target = self._keep(out, target, ("dev", "bus", "tray", "removable", "rotation_rate"))
        if kept_target.get("bus") not in _DISK_BUSES:
            kept_target.attrib.pop("bus", None)
        for child in src:
            if child.tag in _DISK_CHILDREN:
                out.append(self._copy(child, _DISK_CHILDREN[child.tag], f"disk {dev}/{child.tag}"))
            elif child.tag in ("auth", "encryption", "reservations", "shareable", "transient"):
                self.drop(f"{what}/{_label(child)}", "tied to the original's storage")
            elif child.tag.startswith("{"):
                self._foreign(child, f"{what}/")
            elif child.tag not in _DISK_REPLACED:
                self.drop(f"{what}/{_label(child)}", "not on the list of what a copy keeps")
        return out

    def _interface(self, src: ET.Element) -> ET.Element | None:
        spec, kind = self.spec, src.get("type", "")
        if spec.drop_interfaces:
            return None  # by design; the drill names how many it removed
        if spec.network:
            out = ET.Element("interface", {"type": "network"})
            ET.SubElement(out, "mac", {"address": random_mac()})
            ET.SubElement(out, "source", {"network": spec.network})
            kept, what = _NIC_ISOLATED, f"the interface of type {kind!r} moved to network {spec.network}"
        else:
            if kind not in ("network", "bridge"):
                self.drop(f"interface type={kind!r}", "only interfaces on a libvirt network or a bridge are kept")
                return None
            source = src.find("source")
            name = (source.get(kind) if source is not None else None) or ""
            if not _WORD.match(name):
                self.drop(f"interface type={kind!r}", f"no usable {kind} name")
                return None
            out = ET.Element("interface", {"type": kind})
            ET.SubElement(out, "mac", {"address": random_mac()})
            attrs = {kind: name}
            if kind == "network" and source is not None and _WORD.match(source.get("portgroup", "")):
                attrs["portgroup"] = source.get("portgroup", "")
            ET.SubElement(out, "source", attrs)
            vport = src.find("virtualport")
            if vport is not None and vport.get("type") == "openvswitch":
                ET.SubElement(out, "virtualport", {"type": "openvswitch"})  # libvirt makes a new interfaceid
            kept, what = _NIC_KEPT, f"the interface on {kind} {name}"
        for child in src:
            if child.tag in kept:
                if child.tag == "model" and not _WORD.match(child.get("type", "")):
                    continue
                out.append(self._copy(child, kept[child.tag], f"{what}/{child.tag}"))
            elif child.tag.startswith("{"):
                self._foreign(child, f"{what}/")
            elif child.tag not in _NIC_REPLACED:
                self.drop(f"{_label(child)} of {what}", "not on the list of what a copy keeps")
        return out

    def _graphics(self, src: ET.Element) -> ET.Element | None:
        kind = src.get("type", "")
        if kind not in ("vnc", "spice"):
            self.drop(f"graphics type={kind!r}", "only VNC and SPICE displays are kept")
            return None
        parts = []
        given = [src.get("listen")] + [lst.get("address") or lst.get("network") or lst.get("socket") or ""
                                        for lst in src.findall("listen") if lst.get("type") != "none"]
        listens = [x for x in given if x]
        if listens:
            parts.append(f"listen {', '.join(dict.fromkeys(listens))}")
        if src.get("passwd") is not None:
            parts.append("password")
        if src.get("socket"):
            parts.append(f"socket {src.get('socket')}")
        if parts:
            self.drop(f"graphics {kind} {' and '.join(parts)}",
                      "the copy's display is reachable through libvirt only (virt-viewer --attach, virt-manager)")
        out = ET.Element("graphics", {"type": kind})
        if kind == "vnc" and src.get("keymap") and _WORD.match(src.get("keymap", "")):
            out.set("keymap", src.get("keymap", ""))
        ET.SubElement(out, "listen", {"type": "none"})
        return out

    def _serial(self, src: ET.Element) -> ET.Element | None:
        return self._chardev(src, ("pty",))

    def _console(self, src: ET.Element) -> ET.Element | None:
        target = src.find("target")
        if target is not None and target.get("type", "serial") not in ("serial", "virtio"):
            self.drop(_label(src), "only serial and virtio consoles are kept")
            return None
        return self._chardev(src, ("pty",))

    def _chardev(self, src: ET.Element, kinds: tuple[str, ...]) -> ET.Element | None:
        kind = src.get("type", "pty")
        if kind not in kinds + ("file",):
            self.drop(_label(src) + _chardev_where(src), _CHR_WHY.get(kind, "a character device on the host"))
            return None
        if self.spec.serial_log:
            return None  # every serial port and console is replaced by the copy's log
        if kind == "file":
            self.drop(_label(src) + _chardev_where(src), "writes to a file on the host")
            return None
        out = ET.Element(src.tag, {"type": kind})
        for child in src:
            if child.tag == "target":
                out.append(self._copy(child, _CHR_TARGET, f"{src.tag}/target"))
            elif child.tag == "address":
                out.append(self._copy(child, ADDRESS, f"{src.tag}/address"))
            elif child.tag == "log":
                self.drop(f"{src.tag} log {child.get('file')}", "writes to a file on the host")
            elif child.tag.startswith("{"):
                self._foreign(child, f"{src.tag}/")
        return out

    def _channel(self, src: ET.Element) -> ET.Element | None:
        kind = src.get("type", "")
        target = src.find("target")
        ttype = target.get("type", "") if target is not None else ""
        tname = target.get("name", "") if target is not None else ""
        what = _label(src) + (f" ({tname})" if tname else "")
        if ttype != "virtio" or not _WORD.match(tname):
            self.drop(what, "only virtio channels are kept (guestfwd forwards guest connections to the host)")
            return None
        if kind == "unix":
            source = src.find("source")
            if source is not None and source.get("mode", "bind") != "bind":
                self.drop(what, f"connects to a socket on the host ({source.get('path')})")
                return None
            out = ET.Element("channel", {"type": "unix"})
            ET.SubElement(out, "source", {"mode": "bind"})  # libvirt picks the copy's own socket path
        elif kind == "spicevmc" and self.spice:
            out = ET.Element("channel", {"type": "spicevmc"})
        else:
            self.drop(what, _CHR_WHY.get(kind, "not a channel type a copy keeps"))
            return None
        ET.SubElement(out, "target", {"type": "virtio", "name": tname})
        address = src.find("address")
        if address is not None:
            out.append(self._copy(address, ADDRESS, "channel/address"))
        return out

    def _input(self, src: ET.Element) -> ET.Element | None:
        kind = src.get("type", "")
        if kind not in ("mouse", "tablet", "keyboard"):
            self.drop(_label(src), "reads a device of the host")
            return None
        return self._copy(src, Node(frozenset({"type", "bus", "model"}), {"address": ADDRESS}), "input")

    def _video(self, src: ET.Element) -> ET.Element:
        model = src.find("model")
        out = ET.Element("video")
        if model is not None:
            if model.find("acceleration") is not None:
                self.drop("video/model/acceleration", "3D acceleration renders on the host's GPU")
            ET.SubElement(out, "model", {k: v for k, v in model.attrib.items()
                                         if k in ("type", "vram", "ram", "vgamem", "vram64", "heads", "primary")})
        for child in src:
            if child.tag == "address":
                out.append(self._copy(child, ADDRESS, "video/address"))
            elif child.tag not in ("model", "alias"):
                self.drop(f"video/{_label(child)}", "a back end on the host")
        return out

    def _rng(self, src: ET.Element) -> ET.Element:
        backend = src.find("backend")
        model, path = (backend.get("model", ""), (backend.text or "").strip()) if backend is not None else ("", "")
        out = ET.Element("rng", {"model": src.get("model", "virtio")})
        if model == "builtin":
            ET.SubElement(out, "backend", {"model": "builtin"})
        else:
            if (model, path) not in (("random", "/dev/urandom"), ("random", "/dev/random"), ("random", "")):
                self.drop(f"rng backend {model} {path}".rstrip(), "the copy reads /dev/urandom")
            ET.SubElement(out, "backend", {"model": "random"}).text = path or "/dev/urandom"
        for child in src:
            if child.tag in ("rate", "address"):
                out.append(self._copy(child, ADDRESS, f"rng/{child.tag}"))
        return out

    def _tpm(self, src: ET.Element) -> ET.Element | None:
        backend = src.find("backend")
        if backend is None or backend.get("type") != "emulator":
            self.drop(_label(src), "a TPM of the host")
            return None
        out = ET.Element("tpm", {k: v for k, v in src.attrib.items() if k == "model"})
        ET.SubElement(out, "backend", {k: v for k, v in backend.attrib.items() if k in ("type", "version")})
        if len(backend):
            self.drop("tpm/backend state and encryption", "the copy's emulated TPM starts with fresh state")
        return out

    def _vsock(self, src: ET.Element) -> ET.Element | None:
        cid = src.find("cid")
        fixed = cid is not None and cid.get("auto") == "no"
        if self.spec.throwaway:
            self.drop(_label(src) + (f" cid {cid.get('address')}" if fixed else ""),  # type: ignore[union-attr]
                      "a drill has no channel to the host")
            return None
        if fixed:
            self.drop(f"vsock cid {cid.get('address')}", "the copy gets an automatic CID")  # type: ignore[union-attr]
        out = ET.Element("vsock", {"model": src.get("model", "virtio")})
        ET.SubElement(out, "cid", {"auto": "yes"})
        address = src.find("address")
        if address is not None:
            out.append(self._copy(address, ADDRESS, "vsock/address"))
        return out

    def _memory(self, src: ET.Element) -> ET.Element | None:
        model = src.get("model", "")
        if model not in ("dimm", "virtio-mem"):
            source = src.findtext("source/path")
            self.drop(_label(src) + (f" backed by {source}" if source else ""),
                      "memory mapped from a file or device of the host")
            return None
        out = ET.Element("memory", {"model": model})
        for child in src:
            if child.tag in ("target", "address"):
                out.append(self._copy(child, SUBTREE if child.tag == "target" else ADDRESS, f"memory/{child.tag}"))
        return out

    def _watchdog(self, src: ET.Element) -> ET.Element:
        out = self._copy(src, Node(frozenset({"model", "action"}), {"address": ADDRESS}), "watchdog")
        if out.get("action", "reset") not in _WATCHDOG_ACTIONS:
            self.drop(f"watchdog action {out.get('action')!r}", "the copy resets instead (no dumps on the host)")
            out.set("action", "reset")
        return out

    def _emulator(self, src: ET.Element) -> None:
        path = (src.text or "").strip()
        if not re.match(r"^/usr/(bin|libexec)/(qemu-system-[a-z0-9_]+|qemu-kvm|kvm)$", path):
            self.drop(f"emulator {path}", "libvirt starts its own QEMU for the copy")
        return None

    def _audio(self, src: ET.Element) -> None:
        if src.get("type", "none") != "none":
            self.drop(_label(src), "sound is not carried over")
        return None


_WHY = {
    "hostdev": "a host device passed through",
    "filesystem": "a directory of the host shared with the guest",
    "shmem": "memory shared with other processes of the host",
    "redirdev": "redirects a USB device over a socket or SPICE",
    "redirfilter": "belongs to USB redirection, which is not carried over",
    "smartcard": "a smartcard of the host or on a socket",
    "parallel": "parallel ports are not carried over",
    "sound": "sound is not carried over",
    "lease": "a lock-manager lease on a host path",
    "nvram": "a variable store on a host path",
    "crypto": "a crypto device of the host",
    "pstore": "a file of the host",
}
_CHR_WHY = {kind: "a character device on the network" for kind in ("tcp", "udp", "telnet", "tls", "dbus")}
_CHR_WHY.update({"file": "writes to a file on the host", "dev": "a device of the host", "pipe": "a pipe on the host",
                 "unix": "a socket on the host", "stdio": "the QEMU process's own terminal",
                 "vc": "a virtual console of the host", "nmdm": "a device of the host",
                 "spiceport": "a SPICE port", "spicevmc": "a SPICE channel without a SPICE display",
                 "qemu-vdagent": "a clipboard agent of the display"})


_NOT_PUBLIC = (f"a file neither under {', '.join(FIRMWARE_DIRS)} nor one every local user may read, in directories "
               "only root can change")


def boot_files(root: ET.Element) -> list[str]:
    """The host files a domain XML boots from: loader, kernel, initrd, dtb, NVRAM template."""
    paths = [(root.findtext(f"os/{tag}") or "").strip() for tag in ("loader", "kernel", "initrd", "dtb")]
    paths += [el.get("template", "") for el in root.findall("os/nvram")]
    return [p for p in paths if p]


def public_boot_files(xml: str) -> frozenset[str]:
    """The boot files the saved XML names outside ``FIRMWARE_DIRS`` that every local user
    may read anyway, so that a copy reading them learns nothing that is not already open
    to all: regular files owned by root and readable by others, reached through
    directories owned by root that everyone may enter and only root may change (so they
    cannot be swapped before QEMU opens them), symlinks resolved. Direct kernel boot from
    a kernel kept elsewhere (``/srv/vm/vmlinuz``) works in a copy; ``<kernel>/etc/shadow``
    does not. Unlike everything else here this looks at the local filesystem: the
    caller's, which is the host's (restores write the images there too)."""
    return frozenset(p for p in boot_files(parse_untrusted(xml)) if not _system_file(p) and _public(p))


def _public(path: str) -> bool:
    if not path.startswith("/") or posixpath.normpath(path) != path:
        return False
    real = os.path.realpath(path)
    try:
        for p in dict.fromkeys((path, real)):
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or not st.st_mode & stat.S_IROTH:
                return False
            parent = posixpath.dirname(p)
            while True:
                d = os.stat(parent)
                if (not stat.S_ISDIR(d.st_mode) or d.st_uid != 0 or d.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                        or not d.st_mode & stat.S_IXOTH):
                    return False
                if parent == "/":
                    break
                parent = posixpath.dirname(parent)
    except OSError:
        return False
    return True


def _name(tag: str) -> str:
    """``{uri}local`` as ``prefix:local`` for the namespaces libvirt knows, else as is."""
    if tag.startswith("{"):
        uri, local = tag[1:].split("}", 1)
        return f"{_KNOWN_NS[uri]}:{local}" if uri in _KNOWN_NS else f"{local} (namespace {uri})"
    return tag


def _label(el: ET.Element) -> str:
    """The element's start tag with its identifying attributes (never a password)."""
    keys = ("type", "model", "device", "mode", "name", "bus")
    attrs = "".join(f" {k}={el.get(k)!r}" for k in keys if el.get(k) is not None and k in el.attrib)
    return f"<{_name(el.tag)}{attrs}>"


def _chardev_where(el: ET.Element) -> str:
    """Where a character device goes: its sources' host:port or path, and its port."""
    where = []
    for source in el.findall("source"):
        if source.get("host") or source.get("service"):
            where.append(f"{source.get('mode', '')} {source.get('host', '')}:{source.get('service', '')}".strip())
        elif source.get("path"):
            where.append(source.get("path", ""))
    port = el.find("target")
    port_text = f"port {port.get('port')}" if port is not None and port.get("port") else ""
    text = ", ".join(x for x in [*where, port_text] if x)
    return f" ({text})" if text else ""


def _disk_source(disk: ET.Element) -> str:
    source = disk.find("source")
    kind = disk.get("type", "file")
    if source is None:
        return kind
    if kind == "network":
        return f"network {source.get('protocol', '?')} {source.get('name', '')}".rstrip()
    return f"{kind} {source.get('file') or source.get('dev') or source.get('dir') or source.get('pool') or ''}".rstrip()


def _system_file(path: str) -> bool:
    """An absolute, normalised path under one of ``FIRMWARE_DIRS``."""
    return path.startswith("/") and posixpath.normpath(path) == path and path.startswith(FIRMWARE_DIRS)
