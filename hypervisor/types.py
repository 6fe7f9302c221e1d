"""Plain values the hypervisor layer hands to jobs (no libvirt objects leak out)."""
from __future__ import annotations

from dataclasses import dataclass

# Our checkpoints and snapshots carry this prefix; anything else is never touched.
NAME_PREFIX = "virtwarden-"


@dataclass(frozen=True)
class Disk:
    target: str  # vda, sdb, ...
    path: str  # the active image (file or block device)
    format: str  # qcow2, raw
    source_type: str  # file, block
    virtual_size: int = 0

    @property
    def has_bitmaps(self) -> bool:
        """Only qcow2 images can carry persistent dirty bitmaps (checkpoints)."""
        return self.format == "qcow2"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # running, paused, shutoff, crashed, pmsuspended, ...
    persistent: bool
    disks: tuple[Disk, ...]
    xml: str

    @property
    def active(self) -> bool:
        return self.state not in ("shutoff", "crashed")

    def disk(self, target: str) -> Disk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    parent: str | None
    created: int  # seconds since the epoch, as libvirt records it
    disks: tuple[str, ...]  # targets with a bitmap
    xml: str

    @property
    def ours(self) -> bool:
        return self.name.startswith(NAME_PREFIX)


@dataclass(frozen=True)
class JobState:
    """A domain job (backup) as libvirt reports it."""

    active: bool
    ok: bool | None  # None while active
    processed: int
    total: int
    error: str | None = None

    @property
    def fraction(self) -> float:
        return self.processed / self.total if self.total else 0.0


@dataclass(frozen=True)
class HostVersion:
    libvirt: str
    hypervisor: str
    backup_api: bool
    virt_types: tuple[str, ...]
