"""libvirt snapshots for snapshot rotation: list, take (internal or external), delete.

- internal: stored inside each qcow2 image. Of a running domain libvirt takes a full
  system snapshot (disks and memory together: reverting resumes the guest where it
  was), so it is consistent as a whole without a freeze; of a shut-off domain, a disk
  snapshot. Every disk must be qcow2.
- external: disk-only; each disk gets a new qcow2 overlay next to it and the image
  below it freezes; the caller quiesces the guest around it (tasks.quiesce). Deleting
  one merges its overlay back (libvirt >= 9.0).

The snapshots are taken with metadata: ``virsh snapshot-list`` shows them to the
operator, and libvirt knows how to revert and delete them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import libvirt
from virtwarden.hypervisor.types import Hypervisor


def names(hv: Hypervisor, domain: str) -> list[str]:
    dom = hv.lookup(domain)
    with hv.errors("listing snapshots", domain):
        return sorted(dom.snapshotListNames(0))


def kinds(hv: Hypervisor, domain: str) -> dict[str, str]:
    """Every snapshot of the domain (anyone's) -> 'internal' or 'external'."""
    dom = hv.lookup(domain)
    out = {}
    with hv.errors("listing snapshots", domain):
        for snap in dom.listAllSnapshots(0):
            root = ET.fromstring(snap.getXMLDesc(0))
            external = root.findtext("state") == "disk-snapshot" or any(
                d.get("snapshot") == "external" for d in root.findall("disks/disk"))
            out[snap.getName()] = "external" if external else "internal"
    return out


def take_internal(hv: Hypervisor, domain: str, name: str, description: str) -> str:
    """Returns the consistency: 'system' (running: disks and memory) or 'offline'."""
    dom = hv.lookup(domain)
    xml = (f"<domainsnapshot><name>{escape(name)}</name>"
           f"<description>{escape(description)}</description></domainsnapshot>")
    with hv.errors(f"taking internal snapshot {name}", domain):
        running = bool(dom.isActive())
        dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    return "system" if running else "offline"


def take_external(hv: Hypervisor, domain: str, name: str, description: str, overlays: dict[str, str]) -> None:
    """A disk-only snapshot; ``overlays`` maps each disk target to its new overlay file
    (disks not named are left out of the snapshot). Quiescing is the caller's
    (tasks.quiesce freezes around this call, with its own time bounds)."""
    dom = hv.lookup(domain)
    disks = "".join(f"<disk name={quoteattr(t)} snapshot='external'><driver type='qcow2'/>"
                    f"<source file={quoteattr(path)}/></disk>" for t, path in sorted(overlays.items()))
    skipped = "".join(f"<disk name={quoteattr(t)} snapshot='no'/>" for t in _disk_targets(dom) if t not in overlays)
    xml = (f"<domainsnapshot><name>{escape(name)}</name><description>{escape(description)}</description>"
           f"<disks>{disks}{skipped}</disks></domainsnapshot>")
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    with hv.errors(f"taking external snapshot {name}", domain):
        dom.snapshotCreateXML(xml, flags)


def delete(hv: Hypervisor, domain: str, name: str) -> bool:
    """Delete one snapshot (merging an external one back). False when it is gone."""
    dom = hv.lookup(domain)
    with hv.errors(f"deleting snapshot {name}", domain):
        try:
            snap = dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return False
            raise
        snap.delete(0)
    return True


def _disk_targets(dom: libvirt.virDomain) -> list[str]:
    root = ET.fromstring(dom.XMLDesc(0))
    return [target.get("dev", "") for d in root.findall("devices/disk")
            if d.get("device", "disk") == "disk" and (target := d.find("target")) is not None]
