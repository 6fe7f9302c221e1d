"""The isolated libvirt network restore drills attach their throwaway domains to.

``virtwarden-drill`` has no ``<forward>`` and no ``<ip>``: a bridge that connects the
guests on it to each other and to nothing else (no route to the host, no NAT, no DHCP,
no dnsmasq). A drill with ``network: isolated`` creates it when it is absent (persistent,
not autostarted) and starts it when it is inactive; it is never changed or removed
afterwards, so an operator may inspect it like any other network
(``virsh net-dumpxml virtwarden-drill``).
"""
from __future__ import annotations

import logging
from xml.sax.saxutils import escape

import libvirt

from hypervisor.libvirt_host import LibvirtHost
from virtwarden.errors import HypervisorError

log = logging.getLogger(__name__)

DRILL_NETWORK = "virtwarden-drill"


def isolated_xml(name: str) -> str:
    return f"<network><name>{escape(name)}</name></network>"


def ensure_isolated(hv: LibvirtHost, name: str = DRILL_NETWORK) -> str:
    """The isolated network ``name``, defined and active; refuses a network of that name
    that forwards anywhere (someone else's, not isolated). Returns its name."""
    with hv._errors(f"preparing isolated network {name}"):
        try:
            net = hv.conn.networkLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
            log.info("host %s: defining isolated network %s for restore drills", hv.name, name)
            try:
                net = hv.conn.networkDefineXML(isolated_xml(name))
            except libvirt.libvirtError:  # another drill defined it meanwhile
                net = hv.conn.networkLookupByName(name)
        if "<forward" in net.XMLDesc(0):
            raise HypervisorError(f"network {name!r} on host {hv.name} forwards traffic: it is not isolated,"
                                  " so drills will not use it; remove or rename it")
        if not net.isActive():
            try:
                net.create()
            except libvirt.libvirtError as e:  # another drill started it meanwhile
                if not net.isActive():
                    raise
                log.debug("network %s: already started (%s)", name, e.get_error_message())
    return name


def remove(hv: LibvirtHost, name: str) -> bool:
    """Stop and undefine a network; False when there is none of that name."""
    with hv._errors(f"removing network {name}"):
        try:
            net = hv.conn.networkLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return False
            raise
        if net.isActive():
            net.destroy()
        if net.isPersistent():
            net.undefine()
    return True
