"""The isolated libvirt network restore drills attach their throwaway domains to.

``virtwarden-drill`` has no ``<forward>`` and no ``<ip>``: a bridge that connects the
guests on it to each other and to nothing else (no route to the host, no NAT, no DHCP,
no dnsmasq; libvirt turns IPv6 off on a bridge without an IPv6 address, so the host has
no link-local address there either). A network of that name that is not like this is
refused, never used. A drill with ``network: isolated`` creates it when it is absent (persistent,
not autostarted) and starts it when it is inactive; it is never changed or removed
afterwards, so an operator may inspect it like any other network
(``virsh net-dumpxml virtwarden-drill``).
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import libvirt
from virtwarden.hypervisor.types import Hypervisor

from virtwarden.errors import HypervisorError

log = logging.getLogger(__name__)

DRILL_NETWORK = "virtwarden-drill"


def isolated_xml(name: str) -> str:
    return f"<network><name>{escape(name)}</name></network>"


def host_reachable(xml: str) -> str | None:
    """How a network lets its guests reach beyond each other, or None: a ``<forward>``
    (NAT, routing, a host interface), an address of the host on its bridge (``<ip>``,
    which also brings DHCP and DNS from dnsmasq), or IPv6 enabled on the bridge without
    an address (``ipv6='yes'``: the host's link-local address answers)."""
    root = ET.fromstring(xml)
    if root.find("forward") is not None:
        return f"forwards traffic ({root.find('forward').get('mode', 'nat')})"  # type: ignore[union-attr]
    addresses = [ip.get("address", "") for ip in root.findall("ip")]
    if addresses:
        return f"gives the host an address on its bridge ({', '.join(addresses)})"
    if root.get("ipv6") == "yes":
        return "enables IPv6 on its bridge (the host answers on its link-local address)"
    return None


def ensure_isolated(hv: Hypervisor, name: str = DRILL_NETWORK) -> str:
    """The isolated network ``name``, defined and active; refuses a network of that name
    through which a guest reaches the host or beyond (someone else's, not isolated:
    ``host_reachable``). Returns its name."""
    with hv.errors(f"preparing isolated network {name}"):
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
        reaches = host_reachable(net.XMLDesc(0))
        if reaches:
            raise HypervisorError(f"network {name!r} on host {hv.name} {reaches}: it is not isolated,"
                                  " so drills will not use it; remove or rename it")
        if not net.isActive():
            try:
                net.create()
            except libvirt.libvirtError as e:  # another drill started it meanwhile
                if not net.isActive():
                    raise
                log.debug("network %s: already started (%s)", name, e.get_error_message())
    return name


def remove(hv: Hypervisor, name: str) -> bool:
    """Stop and undefine a network; False when there is none of that name."""
    with hv.errors(f"removing network {name}"):
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
