"""qemu-guest-agent through libvirt: is it there, does it answer, freeze and thaw the
guest's filesystems. Used by quiesce (tasks/quiesce.py) and by restore drills (ping).

Every call is bounded. libvirt waits for an agent as long as the domain's agent response
timeout says (5 s by default, or forever for some callers), and first sends a
``guest-sync`` that waits at most ``min(timeout, 5 s)``; a command is only sent once that
sync was answered. ``_bounded`` sets the response timeout for the call and puts libvirt's
default back afterwards (libvirt offers no way to read the previous value; the setting
is per running domain and not persistent).

Only public libvirt calls are used on the normal path (``getTime`` as the ping, ``fsFreeze``,
``fsThaw``). The freeze status has no public call: ``freeze_status`` sends
``guest-fsfreeze-status`` through libvirt-qemu's agent passthrough, which makes libvirt
mark the running domain as tainted (``custom-ga-command`` in its log); quiesce asks for
it only after something went wrong.
"""
from __future__ import annotations

import contextlib
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt
import libvirt_qemu
from virtwarden.hypervisor.types import Hypervisor

from virtwarden.errors import AgentUnresponsive, HypervisorError

CHANNEL = "org.qemu.guest_agent.0"

# libvirt's answers that mean "no agent to talk to", as opposed to an agent that answered
# with an error of its own (a command it disabled, say), which still proves it is alive.
_SILENT = {
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,  # not connected, or no answer in time
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,  # the domain has no agent channel
    libvirt.VIR_ERR_OPERATION_INVALID,  # the domain is not running
}
# ... and those after which a request may still reach the agent and be carried out.
_UNANSWERED = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED}


def connected(hv: Hypervisor, name: str) -> bool:
    """Whether the guest's agent has its virtio port open: the channel's ``state`` in
    the live XML (QEMU reports it when the guest opens or closes the port). A channel
    without a state (an old QEMU) counts as connected: only a ping can tell then."""
    dom = hv.lookup(name)
    with hv.errors("reading the guest agent channel", name):
        xml = dom.XMLDesc(0)
    for target in ET.fromstring(xml).iterfind("./devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == CHANNEL:
            return target.get("state", "connected") == "connected"
    return False


def ping(hv: Hypervisor, name: str, timeout: float) -> bool:
    """Whether the agent answers within ``timeout`` seconds. Never raises for an agent
    that is missing or silent (False); a domain that does not exist still raises."""
    dom = hv.lookup(name)
    try:
        with _bounded(dom, timeout):
            dom.getTime(0)  # guest-get-time: cheap, read-only, a public libvirt call
    except libvirt.libvirtError as e:
        return e.get_error_code() not in _SILENT
    return True


def freeze(hv: Hypervisor, name: str, timeout: float) -> int:
    """Freeze every filesystem of the guest (``guest-fsfreeze-freeze``); the number
    frozen. AgentUnresponsive when the agent does not answer within ``timeout``: the
    request may have reached it and still be carried out, so thaw. HypervisorError when
    it answered with an error: nothing is frozen then (qemu-ga thaws a partial freeze
    itself), or someone else's freeze is in place."""
    dom = hv.lookup(name)
    with (_unresponsive(), hv.errors(f"freezing the guest's filesystems (agent timeout {_seconds(timeout)}s)", name),
          _bounded(dom, timeout)):
        return int(dom.fsFreeze(None, 0))


def thaw(hv: Hypervisor, name: str, timeout: float) -> int:
    """Thaw the guest's filesystems (``guest-fsfreeze-thaw``); the number thawed, 0 when
    none was frozen. The agent handles requests in order, so a thaw that is answered
    came after any freeze sent before it."""
    dom = hv.lookup(name)
    with (hv.errors(f"thawing the guest's filesystems (agent timeout {_seconds(timeout)}s)", name),
          _bounded(dom, timeout)):
        return int(dom.fsThaw(None, 0))


def freeze_status(hv: Hypervisor, name: str, timeout: float) -> str:
    """``"frozen"`` or ``"thawed"``, as the agent reports it (``guest-fsfreeze-status``)."""
    dom = hv.lookup(name)
    seconds = _seconds(timeout)
    with hv.errors(f"reading the guest's freeze status (agent timeout {seconds}s)", name), _bounded(dom, timeout):
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-fsfreeze-status"}), seconds, 0)
    try:
        return str(json.loads(reply)["return"])
    except (ValueError, KeyError, TypeError) as e:
        raise HypervisorError(f"domain {name!r} on host {hv.name}: the guest agent answered "
                              f"guest-fsfreeze-status with {reply!r}") from e


@contextmanager
def _unresponsive() -> Iterator[None]:
    """Tell an agent that did not answer from one that answered with an error."""
    try:
        yield
    except HypervisorError as e:
        cause = e.__cause__
        if isinstance(cause, libvirt.libvirtError) and cause.get_error_code() in _UNANSWERED:
            raise AgentUnresponsive(str(e)) from cause
        raise


@contextmanager
def _bounded(dom: libvirt.virDomain, timeout: float) -> Iterator[None]:
    """Agent calls inside wait at most ``timeout`` seconds (and the sync before each, at
    most the smaller of that and 5 s); libvirt's default is restored afterwards."""
    dom.agentSetResponseTimeout(_seconds(timeout), 0)
    try:
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError):  # the domain stopped meanwhile: nothing left to restore
            dom.agentSetResponseTimeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)


def _seconds(timeout: float) -> int:
    """libvirt takes whole seconds; 0 would mean "do not wait at all"."""
    return max(1, math.ceil(timeout))
