"""Block-layer operations on a running domain, for the ``blockcommit`` backup strategy:
external disk-only snapshots, block commit (non-active, and active with a pivot), block
job state, and each disk's live backing chain.

Everything goes through a ``Hypervisor`` (its connection and its conversion of libvirt
errors into product errors), so libvirt stays inside ``hypervisor/``. The waits are
bounded: a commit that does not finish, or an active commit that never becomes ready
to pivot (a guest writing faster than the merge), is aborted when its time is up, which
leaves the chain as it was, and reported.
"""
from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import libvirt
from virtwarden.hypervisor.types import Hypervisor

from virtwarden.errors import HypervisorError

log = logging.getLogger(__name__)

# Called with (bytes done, bytes to do) while a block job runs; may raise to stop waiting
# (the job itself keeps running in QEMU and is found again by the next run).
Progress = Callable[[int, int], None]

_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    getattr(libvirt, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup",
}
_SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                   | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)


@dataclass(frozen=True)
class Layer:
    """One image of a disk's live backing chain."""

    path: str
    format: str  # qcow2, raw, ... ('' when libvirt does not say)


def paths(chain: tuple[Layer, ...]) -> tuple[str, ...]:
    return tuple(layer.path for layer in chain)


@dataclass(frozen=True)
class BlockJob:
    target: str
    kind: str  # commit | active-commit | pull | copy | backup | unknown
    cur: int
    end: int
    ready: bool  # an active commit or copy that can pivot now

    @property
    def fraction(self) -> float:
        return self.cur / self.end if self.end else 0.0


class BlockJobs:
    """Block operations on the domains of one host (one libvirt connection)."""

    def __init__(self, host: Hypervisor) -> None:
        self.host = host

    def _dom(self, domain: str) -> libvirt.virDomain:
        return self.host.lookup(domain)

    # --- state ------------------------------------------------------------------------
    def chains(self, domain: str) -> dict[str, tuple[Layer, ...]]:
        """Each disk's live backing chain, active image first, from the running
        definition (libvirt records the whole chain there)."""
        dom = self._dom(domain)
        with self.host.errors("reading backing chains", domain):
            return live_chains(dom.XMLDesc(0))

    def job(self, domain: str, target: str) -> BlockJob | None:
        """The block job running on ``target``, if any."""
        dom = self._dom(domain)
        with self.host.errors(f"reading block job of {target}", domain):
            info = dom.blockJobInfo(target, 0)
            if not info:
                return None
            ready = target in _ready_mirrors(dom.XMLDesc(0))
        return BlockJob(target, _KINDS.get(info.get("type", 0), "unknown"), int(info.get("cur", 0)),
                        int(info.get("end", 0)), ready)

    # --- snapshot ---------------------------------------------------------------------
    def snapshot(self, domain: str, name: str, overlays: dict[str, str], *, quiesce: bool = False) -> None:
        """One atomic external disk-only snapshot of every disk in ``overlays`` (target ->
        new qcow2 file), without snapshot metadata: each disk's active image freezes
        and becomes the backing file of its new overlay, all at the same instant. Other
        disks are explicitly left out (libvirt would otherwise give them overlays with
        names of its own choosing). ``quiesce`` asks libvirt to freeze the guest's
        filesystems through qemu-guest-agent around it (fails without an agent)."""
        dom = self._dom(domain)
        with self.host.errors("reading domain disks", domain):
            targets = disk_targets(dom.XMLDesc(0))
        unknown = set(overlays) - set(targets)
        if unknown:
            raise HypervisorError(f"domain {domain!r} on host {self.host.name} has no disk "
                                  f"{', '.join(sorted(unknown))}")
        disks = "".join(
            f"<disk name={quoteattr(t)} snapshot='external' type='file'><driver type='qcow2'/>"
            f"<source file={quoteattr(overlays[t])}/></disk>" if t in overlays
            else f"<disk name={quoteattr(t)} snapshot='no'/>"
            for t in targets)
        xml = (f"<domainsnapshot><name>{escape(name)}</name><description>virtwarden blockcommit backup</description>"
               f"<disks>{disks}</disks></domainsnapshot>")
        flags = _SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0)
        with self.host.errors("creating external disk-only snapshot", domain):
            dom.snapshotCreateXML(xml, flags)

    # --- block commit -----------------------------------------------------------------
    def commit(self, domain: str, target: str, *, top: str, base: str, timeout: float,
               poll: float = 0.2, progress: Progress | None = None, bandwidth: int = 0) -> None:
        """Merge ``top`` (not the active image) and everything between it and ``base``
        into ``base``; wait until the job ends and ``top`` has left the chain."""
        dom = self._dom(domain)
        what = f"block commit of {top} into {base} on {target}"
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES if bandwidth else 0
        with self.host.errors(f"starting {what}", domain):
            dom.blockCommit(target, base, top, bandwidth, flags)
        self.wait(domain, target, pivot=False, timeout=timeout, poll=poll, progress=progress, what=what)
        self._check_left(domain, target, top, what)

    def commit_active(self, domain: str, target: str, *, timeout: float, poll: float = 0.2,
                      progress: Progress | None = None, bandwidth: int = 0) -> None:
        """Merge the active image of ``target`` into its backing file: an active commit,
        then a pivot once QEMU reports it ready, so the backing file becomes the active
        image again."""
        chain = self.chains(domain).get(target, ())
        if len(chain) < 2:
            raise HypervisorError(f"domain {domain!r} on host {self.host.name}: {target} has no backing file "
                                  "to commit its active image into")
        dom = self._dom(domain)
        what = f"active block commit of {chain[0].path} into {chain[1].path} on {target}"
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES if bandwidth else 0
        with self.host.errors(f"starting {what}", domain):
            dom.blockCommit(target, None, None, bandwidth, flags)
        self.wait(domain, target, pivot=True, timeout=timeout, poll=poll, progress=progress, what=what)
        self._check_left(domain, target, chain[0].path, what)

    def wait(self, domain: str, target: str, *, pivot: bool, timeout: float, poll: float = 0.2,
             progress: Progress | None = None, what: str = "block job") -> None:
        """Wait for the block job on ``target`` to end (``pivot`` False), or to become
        ready and then pivot to its new image (``pivot`` True). When ``timeout`` seconds
        pass first, the job is aborted (the chain stays as it was) and HypervisorError
        says so."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(domain, target)
            if job is None:
                return
            if progress:
                progress(job.cur, job.end)
            if pivot and job.ready and self.pivot(domain, target):
                return
            if time.monotonic() > deadline:
                self.abort(domain, target)
                state = "never became ready to pivot" if pivot else "did not finish"
                raise HypervisorError(
                    f"{what} of domain {domain!r} on host {self.host.name} {state} within {timeout:.0f}s "
                    f"({job.cur >> 20} of {job.end >> 20} MiB); it was aborted and the chain left as it was. "
                    "The guest may be writing faster than the merge: retry at a quieter time")
            time.sleep(poll)

    def pivot(self, domain: str, target: str) -> bool:
        """Switch ``target`` to the result of its ready block job; False when QEMU says
        the job is not ready yet."""
        dom = self._dom(domain)
        with self.host.errors(f"pivoting {target}", domain):
            try:
                dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            except libvirt.libvirtError as e:
                if e.get_error_code() in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID):
                    log.debug("domain %s: %s not ready to pivot yet: %s", domain, target, e.get_error_message())
                    return False
                raise
        return True

    def abort(self, domain: str, target: str) -> None:
        """Cancel the block job on ``target`` without pivoting (no job: nothing to do)."""
        dom = self._dom(domain)
        with self.host.errors(f"aborting block job on {target}", domain):
            try:
                dom.blockJobAbort(target, 0)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job running
                    raise

    def _check_left(self, domain: str, target: str, image: str, what: str) -> None:
        if image in paths(self.chains(domain).get(target, ())):
            raise HypervisorError(f"{what} of domain {domain!r} on host {self.host.name} ended, but {image} is "
                                  "still in the chain: QEMU reported an error "
                                  f"(see /var/log/libvirt/qemu/{domain}.log)")


# --- XML parsing (pure) -------------------------------------------------------------
def live_chains(xml: str) -> dict[str, tuple[Layer, ...]]:
    """target -> the layers of its backing chain, active image first. Files and block
    devices by path, network sources as ``protocol:name``."""
    out = {}
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        target = disk.find("target")
        if target is None:
            continue
        chain: list[Layer] = []
        node: ET.Element | None = disk
        fmt = disk.find("driver")
        while node is not None:
            source = node.find("source")
            if source is None:
                break
            path = source.get("file") or source.get("dev")
            if path is None and source.get("name"):
                path = f"{source.get('protocol', 'network')}:{source.get('name')}"
            if path is None:
                break
            chain.append(Layer(path, fmt.get("type", "") if fmt is not None else ""))
            node = node.find("backingStore")
            fmt = node.find("format") if node is not None else None
        out[target.get("dev", "")] = tuple(chain)
    return out


def disk_targets(xml: str) -> list[str]:
    """Every disk device's target (cdroms and floppies included), in definition order."""
    return [t.get("dev", "") for t in ET.fromstring(xml).findall("./devices/disk/target")]


def _ready_mirrors(xml: str) -> set[str]:
    """Targets whose running copy or active commit QEMU reports ready to pivot."""
    out = set()
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        mirror, target = disk.find("mirror"), disk.find("target")
        if mirror is not None and target is not None and mirror.get("ready") == "yes":
            out.add(target.get("dev", ""))
    return out

