"""Rewriting a saved domain XML for a copy of the domain: pure ElementTree, no libvirt.

A restore as a new domain and a restore drill both define a second domain from the XML
stored with a restore point. That copy must never be mistaken for the original or clash
with it: a new name, a new UUID, new MAC addresses, disks pointing at the restored
images, and (for a drill) no network and its serial console written to a file. Things
that tie a domain to one running instance (the live ``id``, device aliases, run-time
paths) are dropped so libvirt assigns its own.

A restore in place keeps the domain and only moves disks onto new images
(``repoint_disks``).
"""
from __future__ import annotations

import secrets
import uuid as uuid_module
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from virtwarden.errors import VirtwardenError

# The locally administered range libvirt itself uses for generated MACs (52:54:00 is
# QEMU's); a copy gets a random address in it.
MAC_PREFIX = "52:54:00"


@dataclass(frozen=True)
class CopySpec:
    """What to change. ``disks`` maps each target (vda, ...) to the image it should
    use; disks not named keep their source unless ``drop_other_disks``."""

    name: str
    disks: dict[str, str]
    uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    new_macs: bool = True
    drop_interfaces: bool = False  # a drill's throwaway domain: no network at all
    network: str | None = None  # or attach every interface to this (isolated) network
    serial_log: str | None = None  # write the first serial port to this file
    drop_other_disks: bool = False


def random_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def copy_xml(xml: str, spec: CopySpec) -> str:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise VirtwardenError(f"the saved domain XML cannot be parsed: {e}") from e
    root.attrib.pop("id", None)
    _set_text(root, "name", spec.name)
    _set_text(root, "uuid", spec.uuid)
    for tag in ("title", "description"):
        el = root.find(tag)
        if el is not None:
            root.remove(el)
    devices = root.find("devices")
    if devices is None:
        raise VirtwardenError("the saved domain XML has no <devices>")
    _rewrite_disks(devices, spec)
    _rewrite_interfaces(devices, spec)
    if spec.serial_log:
        _serial_to_file(devices, spec.serial_log)
    for parent in list(root.iter()):  # aliases are run-time names; libvirt assigns new ones
        for child in list(parent):
            if child.tag == "alias":
                parent.remove(child)
    for el in root.findall("seclabel"):
        if el.get("type") == "dynamic":
            for sub in list(el):
                el.remove(sub)  # the old instance's labels
    return ET.tostring(root, encoding="unicode")


def repoint_disks(xml: str, disks: dict[str, tuple[str, str]]) -> str:
    """The same domain with each disk in ``disks`` (target -> (image path, format)) on
    that image alone: its source and driver type replaced, any backing chain or mirror
    dropped; everything else as it was."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise VirtwardenError(f"the domain XML cannot be parsed: {e}") from e
    missing = set(disks)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev in disks and disk.get("device", "disk") == "disk":
            missing.discard(dev)
            _point_disk(disk, *disks[dev])
    if missing:
        raise VirtwardenError(f"the domain XML has no disk {', '.join(sorted(missing))}")
    return ET.tostring(root, encoding="unicode")


def disk_sources(xml: str) -> dict[str, str]:
    """Target -> source file of each file-backed disk of a domain XML."""
    root = ET.fromstring(xml)
    out = {}
    for disk in root.findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            out[target.get("dev", "")] = source.get("file", "")
    return out


def _set_text(root: ET.Element, tag: str, value: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.SubElement(root, tag)
    el.text = value


def _rewrite_disks(devices: ET.Element, spec: CopySpec) -> None:
    missing = set(spec.disks)
    for disk in list(devices.findall("disk")):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if disk.get("device", "disk") != "disk" or dev not in spec.disks:
            if spec.drop_other_disks:
                devices.remove(disk)
            continue
        missing.discard(dev)
        _point_disk(disk, spec.disks[dev], "qcow2")
    if missing:
        raise VirtwardenError(f"the saved domain XML has no disk {', '.join(sorted(missing))}")


def _point_disk(disk: ET.Element, path: str, fmt: str) -> None:
    disk.set("type", "file")
    for tag in ("source", "backingStore", "mirror"):
        for el in disk.findall(tag):
            disk.remove(el)
    source = ET.Element("source", {"file": path})
    driver = disk.find("driver")
    if driver is None:
        driver = ET.SubElement(disk, "driver", {"name": "qemu"})
    driver.set("type", fmt)
    disk.insert(list(disk).index(driver) + 1, source)


def _rewrite_interfaces(devices: ET.Element, spec: CopySpec) -> None:
    for iface in list(devices.findall("interface")):
        if spec.drop_interfaces:
            devices.remove(iface)
            continue
        if spec.network:
            iface.set("type", "network")
            for tag in ("source", "target", "virtualport"):
                for el in iface.findall(tag):
                    iface.remove(el)
            iface.insert(0, ET.Element("source", {"network": spec.network}))
        if spec.new_macs:
            mac = iface.find("mac")
            if mac is None:
                mac = ET.Element("mac")
                iface.insert(0, mac)
            mac.set("address", random_mac())


def _serial_to_file(devices: ET.Element, path: str) -> None:
    for tag in ("serial", "console"):
        for el in devices.findall(tag):
            devices.remove(el)
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": path})
    ET.SubElement(serial, "target", {"port": "0"})
