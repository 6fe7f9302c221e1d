"""Defining, starting, stopping and removing domains: what restores as a new domain,
restores in place and drills need. Each function takes a ``Hypervisor`` and uses its
conversion of libvirt errors into product errors.

Stopping is bounded: ``shutdown`` asks the guest (ACPI, then the agent if it has one)
and waits up to its timeout before it pulls the plug, and ``remove`` never leaves a
half-removed domain silently: it says what it could not remove.
"""
from __future__ import annotations

import logging
import time

import libvirt
from virtwarden.hypervisor.types import Hypervisor

from virtwarden.errors import DomainNotFound, HypervisorError

log = logging.getLogger(__name__)

_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def exists(hv: Hypervisor, name: str) -> bool:
    try:
        hv.lookup(name)
    except DomainNotFound:
        return False
    return True


def define(hv: Hypervisor, xml: str, name: str) -> None:
    """Define a persistent domain; refuses to replace an existing one of that name."""
    if exists(hv, name):
        raise HypervisorError(f"host {hv.name} already has a domain named {name!r}; choose another name")
    with hv.errors("defining domain", name):
        hv.conn.defineXML(xml)


def start(hv: Hypervisor, name: str, *, paused: bool = False, autodestroy: bool = False) -> None:
    """Start a defined domain. With ``autodestroy`` libvirt powers it off as soon as
    this connection closes, so it cannot outlive the process that started it."""
    dom = hv.lookup(name)
    flags = (libvirt.VIR_DOMAIN_START_PAUSED if paused else 0) | (
        libvirt.VIR_DOMAIN_START_AUTODESTROY if autodestroy else 0)
    with hv.errors("starting domain", name):
        dom.createWithFlags(flags)


def is_running(hv: Hypervisor, name: str) -> bool:
    dom = hv.lookup(name)
    with hv.errors("reading state", name):
        return bool(dom.isActive())


def shutdown(hv: Hypervisor, name: str, *, timeout: float, poll: float = 0.5) -> str:
    """Stop a running domain: a clean shutdown request, then, after ``timeout`` seconds,
    a forced power-off. Returns 'was-off', 'shutdown' or 'destroyed'."""
    dom = hv.lookup(name)
    with hv.errors("shutting down domain", name):
        if not dom.isActive():
            return "was-off"
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN | libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError as e:  # no ACPI, no agent: only a power-off is left
            log.info("domain %s: clean shutdown refused (%s); powering off", name, e.get_error_message())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return "shutdown"
            time.sleep(poll)
    destroy(hv, name)
    return "destroyed"


def destroy(hv: Hypervisor, name: str) -> None:
    """Power a domain off now; nothing happens when it is not running."""
    dom = hv.lookup(name)
    with hv.errors("powering off domain", name):
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                raise


def remove(hv: Hypervisor, name: str) -> bool:
    """Power off and undefine a domain (its metadata only: disks stay where they are).
    Returns False when there was no such domain."""
    try:
        dom = hv.lookup(name)
    except DomainNotFound:
        return False
    destroy(hv, name)
    with hv.errors("undefining domain", name):
        try:
            if dom.isPersistent():
                dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return True


def names(hv: Hypervisor, prefix: str = "") -> list[str]:
    with hv.errors("listing domains"):
        return sorted(d.name() for d in hv.conn.listAllDomains() if d.name().startswith(prefix))


def has_managed_save(hv: Hypervisor, name: str) -> bool:
    """Whether a shut-off domain has saved memory state (``virsh managedsave``) that its
    next start would resume from."""
    dom = hv.lookup(name)
    with hv.errors("reading managed save state", name):
        return bool(dom.hasManagedSaveImage(0))


def discard_managed_save(hv: Hypervisor, name: str) -> bool:
    """Remove that saved state, so the next start boots afresh; True when there was one."""
    dom = hv.lookup(name)
    with hv.errors("removing managed save state", name):
        if not dom.hasManagedSaveImage(0):
            return False
        dom.managedSaveRemove(0)
        return True


def update_definition(hv: Hypervisor, name: str, xml: str) -> None:
    """Replace a shut-off domain's persistent definition (same name and UUID)."""
    with hv.errors("updating domain definition", name):
        hv.conn.defineXML(xml)
