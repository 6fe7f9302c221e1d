"""The interface jobs use to reach a host (``Hypervisor``), and the plain values it
hands them (no libvirt objects leak out to jobs)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    import libvirt

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


class Hypervisor(Protocol):
    """One connection to one host: everything a job does to a host goes through it.

    ``hypervisor.libvirt_host.LibvirtHost`` is the implementation; a job is handed one
    (``JobContext.hypervisor``, opened by the worker) and opens any other host through
    ``JobContext.connect`` (``hypervisor.connect``). The operations on domains,
    networks, snapshots, block jobs, the guest agent and migration are the functions of
    ``hypervisor.domains``, ``networks``, ``snapshots``, ``blockjobs``, ``agent`` and
    ``migrate``, each taking a ``Hypervisor``; they build on the libvirt access below.
    Every error comes out as a product error (virtwarden.errors), never a libvirt one.
    """

    @property
    def name(self) -> str: ...  # the host's name in the configuration

    @property
    def uri(self) -> str: ...  # its libvirt URI (may carry a password: show ``shown_uri``)

    @property
    def shown_uri(self) -> str: ...

    # --- connection ---------------------------------------------------------------------
    def open(self) -> Self: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

    # --- host ---------------------------------------------------------------------------
    def version(self) -> HostVersion: ...
    def qemu_user(self, domain: str | None = None) -> tuple[int, int] | None: ...

    # --- domains ------------------------------------------------------------------------
    def domain(self, name: str, *, sizes: bool = True) -> DomainInfo: ...
    def domains(self, *, sizes: bool = True) -> list[DomainInfo]: ...
    def domain_names(self) -> list[str]: ...
    def inactive_xml(self, name: str, *, secure: bool = False) -> str: ...

    # --- checkpoints --------------------------------------------------------------------
    def checkpoints(self, name: str) -> list[Checkpoint]: ...
    def checkpoint_xml(self, name: str, checkpoint: str) -> str: ...
    def delete_checkpoint(self, name: str, checkpoint: str, *, metadata_only: bool = False) -> None: ...
    def redefine_checkpoint(self, name: str, xml: str, *, validate: bool = True) -> None: ...

    # --- backup jobs --------------------------------------------------------------------
    def begin_backup(self, name: str, targets: dict[str, str], *, checkpoint: str,
                     incremental_from: str | None, bitmap_disks: set[str], skip: set[str],
                     pull_socket: str | None = None) -> None: ...
    def backup_state(self, name: str) -> JobState: ...
    def has_active_job(self, name: str) -> bool: ...
    def backup_job_running(self, name: str) -> bool: ...
    def abort_job(self, name: str) -> None: ...

    # --- libvirt access: for the modules of hypervisor/ only ----------------------------
    # The one place the raw libvirt objects are typed. Jobs never call these: they call
    # the methods above and the functions of hypervisor/*.py, which use these three.
    @property
    def conn(self) -> libvirt.virConnect: ...
    def lookup(self, name: str) -> libvirt.virDomain: ...  # DomainNotFound when absent
    def errors(self, what: str, domain: str | None = None) -> AbstractContextManager[None]: ...


# Host name, libvirt URI -> a Hypervisor for that host, not opened yet (open it, or use it
# as a context manager). ``hypervisor.connect`` is the one jobs and the worker use.
Connect = Callable[[str, str], Hypervisor]
