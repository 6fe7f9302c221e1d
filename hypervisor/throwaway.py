"""Making a copy of a domain boot the same way every time, and reading a saved XML for
what a drill watches: pure ElementTree, no libvirt.

``domxml.copy_domain`` rebuilds the copy from an allowlist, so it shares nothing with
the original (see hypervisor.xml_allowlist). A drill's copy must also boot the same way
every time (``fixed_boot_order``): with ``<boot dev='hd'/>`` and several disks, SeaBIOS
registers the disks in an order that varies from boot to boot (about one start in eight
boots the second disk here), so the copy boots the first disk by target name (vda
before vdb), which is what "the first hard disk" means.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from virtwarden.errors import VirtwardenError

AGENT_CHANNEL = "org.qemu.guest_agent.0"


def fixed_boot_order(xml: str) -> str:
    """Per-device boot order in place of ``<os><boot dev=.../>`` when that is ambiguous
    (booting from ``hd`` with more than one disk); any other XML is returned as it is."""
    root = _parse(xml)
    os_el, devices = root.find("os"), root.find("devices")
    if os_el is None or devices is None or root.find("devices/*/boot") is not None:
        return xml
    boots = os_el.findall("boot")
    wanted = [b.get("dev", "") for b in boots] or ["hd"]  # libvirt's default is hd
    disks = sorted((d for d in devices.findall("disk") if d.get("device", "disk") == "disk"), key=_target_key)
    if "hd" not in wanted or len(disks) < 2:
        return xml
    classes = {"hd": disks[:1], "cdrom": [d for d in devices.findall("disk") if d.get("device") == "cdrom"],
               "fd": [d for d in devices.findall("disk") if d.get("device") == "floppy"],
               "network": devices.findall("interface")}
    for b in boots:
        os_el.remove(b)
    order = 0
    for dev in wanted:
        for el in classes.get(dev, []):
            order += 1
            ET.SubElement(el, "boot", {"order": str(order)})
    return ET.tostring(root, encoding="unicode")


def _target_key(disk: ET.Element) -> tuple[int, str]:
    target = disk.find("target")
    name = target.get("dev", "") if target is not None else ""
    return len(name), name  # vdz before vdaa


def has_agent_channel(xml: str) -> bool:
    """Whether the domain has a qemu-guest-agent channel."""
    return any(t.get("name") == AGENT_CHANNEL for t in _parse(xml).findall("devices/channel/target"))


def interfaces(xml: str) -> int:
    return len(_parse(xml).findall("devices/interface"))


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise VirtwardenError(f"the saved domain XML cannot be parsed: {e}") from e
