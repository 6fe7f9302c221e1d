"""The hypervisor edge: libvirt (libvirt_host.py) and qemu-img (qemu_img.py).

Jobs see a host only as a ``Hypervisor`` (hypervisor.types); ``connect`` makes one.
"""
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


def connect(name: str, uri: str) -> Hypervisor:
    """A connection to host ``name`` at libvirt ``uri``, not opened yet (open it, or use
    it as a context manager): what the worker hands a job, and what a job uses to reach
    another host. Importing libvirt is left to the first call. (Returning a LibvirtHost
    as a Hypervisor is also where mypy checks that it implements the whole interface.)"""
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    return LibvirtHost(name, uri)


__all__ = ["NAME_PREFIX", "Checkpoint", "Connect", "Disk", "DomainInfo", "HostVersion", "Hypervisor", "JobState",
           "connect"]
