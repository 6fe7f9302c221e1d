"""The hypervisor edge: libvirt (libvirt_host.py) and qemu-img (qemu_img.py)."""
from hypervisor.types import NAME_PREFIX, Checkpoint, Disk, DomainInfo, HostVersion, JobState

__all__ = ["NAME_PREFIX", "Checkpoint", "Disk", "DomainInfo", "HostVersion", "JobState"]
