"""The hypervisor edge: libvirt (libvirt_host.py) and qemu-img (qemu_img.py).

Jobs see a host only as a ``Hypervisor`` (hypervisor.types); ``connect`` makes one.
``configure`` sets, once per process, how long a libvirtd may stay silent before a
connection to it counts as lost (``Liveness``).
"""
from dataclasses import dataclass

from virtwarden.hypervisor.types import (
    NAME_PREFIX,
    Checkpoint,
    Connect,
    Disk,
    DomainInfo,
    HostVersion,
    Hypervisor,
    JobState,
)


@dataclass(frozen=True)
class Liveness:
    """How a connection notices a libvirtd that stopped answering (stopped, hung, or
    behind a network that dropped it): libvirt itself waits for ever. Opening gives up
    after ``open_timeout`` seconds; an open connection sends a keepalive probe after
    ``keepalive_interval`` seconds of silence and is closed by libvirt after
    ``keepalive_count`` probes go unanswered, which fails the call waiting on it."""

    keepalive_interval: int = 5
    keepalive_count: int = 5
    open_timeout: float = 30.0


_liveness = [Liveness()]


def configure(liveness: Liveness) -> None:
    """This process's ``Liveness`` for connections opened from now on (``libvirt`` in
    the configuration; ``config.load_for_process`` calls it)."""
    _liveness[0] = liveness


def liveness() -> Liveness:
    return _liveness[0]


def connect(name: str, uri: str, *, keepalive: bool = True) -> Hypervisor:
    """A connection to host ``name`` at libvirt ``uri``, not opened yet (open it, or use
    it as a context manager): what the worker hands a job, and what a job uses to reach
    another host. Importing libvirt is left to the first call. (Returning a LibvirtHost
    as a Hypervisor is also where mypy checks that it implements the whole interface.)
    ``keepalive=False`` only in a process that forks afterwards (see LibvirtHost)."""
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    return LibvirtHost(name, uri, keepalive=keepalive)


__all__ = ["NAME_PREFIX", "Checkpoint", "Connect", "Disk", "DomainInfo", "HostVersion", "Hypervisor", "JobState",
           "Liveness", "configure", "connect", "liveness"]
