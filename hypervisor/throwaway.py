"""Making a copy of a domain fit to boot as a throwaway next to its original: pure
ElementTree, no libvirt.

``domxml.copy_xml`` gives the copy a new identity and its own disks. A restore drill's
throwaway domain must also share nothing else with the original that the original may
be using or that the copy could change (``isolate``):

- host devices (``<hostdev>``) and host directories (``<filesystem>``) are dropped: the
  original holds the devices, and a shared directory is live data;
- a UEFI variable store named in ``<nvram>`` is the original's file: the path is
  removed so libvirt creates a fresh store for the copy from the template (and deletes
  it when the copy is undefined);
- fixed VNC/SPICE ports would clash with the original's: the copy gets automatic ports;
- channel sockets (``<channel type='unix'>``, e.g. the guest agent's) with an explicit
  path would collide with the original's socket: libvirt chooses new paths.

And it must boot the same way every time (``fixed_boot_order``): with ``<boot dev='hd'/>``
and several disks, SeaBIOS registers the disks in an order that varies from boot to boot
(about one start in eight boots the second disk here), so the copy boots the first disk
by target name (vda before vdb), which is what "the first hard disk" means.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from virtwarden.errors import VirtwardenError

AGENT_CHANNEL = "org.qemu.guest_agent.0"
_DROPPED = ("hostdev", "filesystem")
_PORT_ATTRS = ("port", "tlsPort", "websocket")


def isolate(xml: str) -> str:
    root = _parse(xml)
    devices = root.find("devices")
    if devices is not None:
        for tag in _DROPPED:
            for el in devices.findall(tag):
                devices.remove(el)
    _unshare(root)
    return ET.tostring(root, encoding="unicode")


def unshare(xml: str) -> str:
    """Only what would clash with the original while both run (variable store, fixed
    ports, socket paths): for a restored domain that keeps its devices."""
    root = _parse(xml)
    _unshare(root)
    return ET.tostring(root, encoding="unicode")


def _unshare(root: ET.Element) -> None:
    devices = root.find("devices")
    if devices is not None:
        for graphics in devices.findall("graphics"):
            if any(graphics.get(a) for a in _PORT_ATTRS) or graphics.get("autoport") == "no":
                for attr in _PORT_ATTRS:
                    graphics.attrib.pop(attr, None)
                graphics.set("autoport", "yes")
        for channel in devices.findall("channel"):
            source = channel.find("source")
            if channel.get("type") == "unix" and source is not None:
                source.attrib.pop("path", None)
    nvram = root.find("os/nvram")
    if nvram is not None:
        nvram.text = None
        if not nvram.attrib:
            root.find("os").remove(nvram)  # type: ignore[union-attr]


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
