"""libvirt snapshots for snapshot rotation: list, take (internal or external), delete.

- internal: stored inside each qcow2 image. Of a running domain libvirt takes a full
  system snapshot (disks and memory together: reverting resumes the guest where it
  was), so it is consistent as a whole without a freeze; of a shut-off domain, a disk
  snapshot. Every disk must be qcow2.
- external: disk-only; each disk gets a new qcow2 overlay next to it and the image
  below it freezes. libvirt can quiesce these through qemu-guest-agent
  (VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE: it freezes, snapshots and thaws, and thaws
  again when anything fails). Deleting one merges its overlay back (libvirt >= 9.0).

The snapshots are taken with metadata: ``virsh snapshot-list`` shows them to the
operator, and libvirt knows how to revert and delete them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import libvirt

from hypervisor.libvirt_host import LibvirtHost
from virtwarden.errors import HypervisorError

_AGENT_ERRORS = {getattr(libvirt, n) for n in ("VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED")
                 if hasattr(libvirt, n)}


class QuiesceUnavailable(HypervisorError):
    """The guest agent could not freeze the guest's filesystems."""


def names(hv: LibvirtHost, domain: str) -> list[str]:
    dom = hv._dom(domain)
    with hv._errors("listing snapshots", domain):
        return sorted(dom.snapshotListNames(0))


def take_internal(hv: LibvirtHost, domain: str, name: str, description: str) -> str:
    """Returns the consistency: 'system' (running: disks and memory) or 'offline'."""
    dom = hv._dom(domain)
    xml = f"<domainsnapshot><name>{escape(name)}</name><description>{escape(description)}</description></domainsnapshot>"
    with hv._errors(f"taking internal snapshot {name}", domain):
        running = bool(dom.isActive())
        dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    return "system" if running else "offline"


def take_external(hv: LibvirtHost, domain: str, name: str, description: str, overlays: dict[str, str], *,
                  quiesce: bool) -> str:
    """A disk-only snapshot; ``overlays`` maps each disk target to its new overlay file
    (disks not named are left out of the snapshot). Returns 'quiesced', 'crash' or
    'offline'. QuiesceUnavailable when ``quiesce`` and the agent cannot freeze."""
    dom = hv._dom(domain)
    disks = "".join(f"<disk name={quoteattr(t)} snapshot='external'><driver type='qcow2'/>"
                    f"<source file={quoteattr(path)}/></disk>" for t, path in sorted(overlays.items()))
    skipped = "".join(f"<disk name={quoteattr(t)} snapshot='no'/>" for t in _disk_targets(dom) if t not in overlays)
    xml = (f"<domainsnapshot><name>{escape(name)}</name><description>{escape(description)}</description>"
           f"<disks>{disks}{skipped}</disks></domainsnapshot>")
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    with hv._errors(f"taking external snapshot {name}", domain):
        running = bool(dom.isActive())
        if not running:
            dom.snapshotCreateXML(xml, flags)
            return "offline"
        if quiesce:
            try:
                dom.snapshotCreateXML(xml, flags | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE)
            except libvirt.libvirtError as e:
                if _agent_problem(e):
                    raise QuiesceUnavailable(f"domain {domain!r} on host {hv.name}: the guest agent could not"
                                             f" freeze its filesystems: {e.get_error_message()}") from e
                raise
            return "quiesced"
        dom.snapshotCreateXML(xml, flags)
    return "crash"


def delete(hv: LibvirtHost, domain: str, name: str) -> bool:
    """Delete one snapshot (merging an external one back). False when it is gone."""
    dom = hv._dom(domain)
    with hv._errors(f"deleting snapshot {name}", domain):
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
    return [d.find("target").get("dev", "") for d in root.findall("devices/disk")
            if d.get("device", "disk") == "disk" and d.find("target") is not None]


def _agent_problem(e: libvirt.libvirtError) -> bool:
    if e.get_error_code() in _AGENT_ERRORS:
        return True
    msg = (e.get_error_message() or "").lower()
    return "agent" in msg or "quiesce" in msg or "fsfreeze" in msg
