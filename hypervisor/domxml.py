"""Rewriting domain XML: pure ElementTree, no libvirt.

A restore as a new domain and a restore drill both define a second domain from the XML
stored with a restore point (``copy_domain``). That XML comes from storage and is not
trusted: the copy is rebuilt from an allowlist (``hypervisor.xml_allowlist``), never
defined from the saved text with parts deleted. It must also never be mistaken for the
original or clash with it: a new name, a new UUID, new MAC addresses, only the restored
disks, its own UEFI variable store, a display reachable through libvirt only, sockets
libvirt places itself, and (for a drill) no network or only the isolated one and its
serial console written to a file.

A restore in place keeps the domain and only moves disks onto new images
(``repoint_disks``); its definition is the host's own, read from libvirt.

Secrets (graphics passwords) are not kept in a restore point (backups read the domain
XML without libvirt's secure flag); ``redact`` removes those that points made before
that still hold, wherever a saved XML is written or kept.
"""
from __future__ import annotations

import re
import uuid as uuid_module
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from virtwarden.hypervisor import xml_allowlist

from virtwarden.errors import VirtwardenError


@dataclass(frozen=True)
class CopySpec:
    """What the copy is. ``disks`` maps each restored target (vda, ...) to its image;
    every other disk of the saved XML is left out."""

    name: str
    disks: dict[str, str]
    uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    drop_interfaces: bool = False  # a drill's throwaway domain: no network at all
    network: str | None = None  # or every interface on this (isolated) network
    serial_log: str | None = None  # every serial port and console replaced by this file
    throwaway: bool = False  # a drill's domain: no channel to the host at all (vsock)
    # Boot files outside the system directories the copy may read (xml_allowlist.public_boot_files).
    host_files: frozenset[str] = frozenset()


Rebuilt = xml_allowlist.Rebuilt


def copy_domain(xml: str, spec: CopySpec) -> Rebuilt:
    """The copy's XML, rebuilt from the allowlist, and what of the saved XML it left out."""
    return xml_allowlist.rebuild(xml_allowlist.parse_untrusted(xml), spec)


def redact(xml: str) -> str:
    """The same XML without graphics passwords (``passwd`` attributes), otherwise
    unchanged byte for byte where it can be; for a domain.xml the operator reads."""
    text = re.sub(r"""(<graphics\b[^<>]*?)\s+passwd=(?:'[^']*'|"[^"]*")""", r"\1", xml)
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return text  # not XML: nothing in it is a password libvirt would read
    graphics = list(root.iter("graphics"))
    if not any("passwd" in g.attrib for g in graphics):
        return text
    for g in graphics:  # something the pattern did not catch: rewrite it as a document
        g.attrib.pop("passwd", None)
    return ET.tostring(root, encoding="unicode")


def carry_passwords(xml: str, secure_xml: str) -> str:
    """``xml`` with the graphics passwords of ``secure_xml`` (the same domain's
    definition read with libvirt's secure flag), display by display in order per
    type. A restore in place keeps its journal's copy of the old definition without
    them and takes them from the definition libvirt holds when it puts it back."""
    try:
        source = ET.fromstring(secure_xml)
    except ET.ParseError as e:
        raise VirtwardenError(f"the domain XML cannot be parsed: {e}") from e
    secrets_by_type: dict[str, list[dict[str, str]]] = {}
    for g in source.iter("graphics"):
        keep = {k: v for k, v in g.attrib.items() if k in ("passwd", "passwdValidTo")}
        secrets_by_type.setdefault(g.get("type", ""), []).append(keep)
    if not any(s for kept in secrets_by_type.values() for s in kept):
        return xml
    root = ET.fromstring(xml)
    for kind, kept in secrets_by_type.items():
        for g, attrs in zip((g for g in root.iter("graphics") if g.get("type", "") == kind), kept, strict=False):
            g.attrib.update(attrs)
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
