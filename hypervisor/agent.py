"""Talking to a guest's qemu-guest-agent.

Only what a restore drill needs so far: ``ping``, which answers whether the agent in
the guest is up and responding. The agent's channel must exist in the domain's XML
(``<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>``);
without it, or before the guest has started its agent, the answer is simply False.
"""
from __future__ import annotations

import logging

import libvirt
import libvirt_qemu

from hypervisor.libvirt_host import LibvirtHost

log = logging.getLogger(__name__)

_PING = '{"execute":"guest-ping"}'


def ping(hv: LibvirtHost, name: str, timeout: int) -> bool:
    """True when the guest agent of ``name`` answered a guest-ping within ``timeout``
    seconds; False when it is not connected, not responding or the domain is not running."""
    dom = hv._dom(name)
    try:
        libvirt_qemu.qemuAgentCommand(dom, _PING, max(1, int(timeout)), 0)
    except libvirt.libvirtError as e:
        log.debug("domain %s on host %s: guest agent did not answer: %s", name, hv.name, e.get_error_message())
        return False
    return True
