"""Host capacity and live migration, through a ``Hypervisor`` (its connection and its
conversion of libvirt errors into product errors).

Capacity is what libvirt says now: CPUs and memory of the node, and each domain with
the memory and vCPUs it was given. Free memory is the node's MemFree plus buffers and
page cache (``virsh nodememstats``): a host that backs guests up keeps much of its
memory as page cache, which the kernel hands back when a guest needs it.

A migration is live, client-managed (this process holds a connection to both hosts,
so neither libvirtd needs a route to the other's API) and peer-to-peer free; the
domain's definition goes with it (PERSIST_DEST) and leaves the source (UNDEFINE_SOURCE),
so it exists on exactly one host afterwards. Its time is bounded: when the timeout
passes, the job is aborted (``abortJob``) and the domain keeps running where it was.
Post-copy is never used: a post-copy migration that fails loses the guest.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import libvirt
from virtwarden.hypervisor.types import Hypervisor

from virtwarden.errors import HypervisorError, VirtwardenError

log = logging.getLogger(__name__)
KiB = 1024

_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
          | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
_COMPLETED = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED


@dataclass(frozen=True)
class Guest:
    """A domain as capacity sees it: ``memory`` is its maximum (what the destination
    must be able to give it), in bytes."""

    name: str
    uuid: str
    running: bool
    memory: int
    vcpus: int
    persistent: bool


@dataclass(frozen=True)
class Capacity:
    cpus: int
    memory_total: int  # bytes
    memory_free: int  # bytes: MemFree + buffers + page cache
    guests: tuple[Guest, ...]

    @property
    def running(self) -> tuple[Guest, ...]:
        return tuple(g for g in self.guests if g.running)

    def to_json(self) -> dict:
        return {"cpus": self.cpus, "memory_total": self.memory_total, "memory_free": self.memory_free,
                "running": len(self.running), "vcpus_running": sum(g.vcpus for g in self.running),
                "memory_running": sum(g.memory for g in self.running),
                "guests": [g.__dict__ for g in self.guests]}


def capacity(hv: Hypervisor) -> Capacity:
    with hv.errors("reading host capacity"):
        info = hv.conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
        stats = hv.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        guests = []
        for dom in hv.conn.listAllDomains(0):
            try:
                state, max_kib, _cur_kib, vcpus, _cpu_time = dom.info()
                guests.append(Guest(dom.name(), dom.UUIDString(), state in _RUNNING, max_kib * KiB, vcpus,
                                    bool(dom.isPersistent())))
            except libvirt.libvirtError as e:  # gone while we listed: not ours to count
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
    free = sum(stats.get(k, 0) for k in ("free", "buffers", "cached")) * KiB
    total = stats.get("total", info[1] * 1024) * KiB
    return Capacity(int(info[2]), total, free, tuple(sorted(guests, key=lambda g: g.name)))


_RUNNING = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED)


# --- migration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """A running migration as libvirt reports it (bytes; ``total`` 0 until known)."""

    processed: int
    total: int
    remaining: int
    elapsed_ms: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.processed / self.total) if self.total else 0.0


@dataclass(frozen=True)
class Outcome:
    elapsed_s: float
    downtime_ms: int | None  # as the destination's completed job statistics say, if they do


class MigrationTimeout(HypervisorError):
    """The migration did not finish in time; it was aborted and the domain stayed put."""


def migration_uri(src_uri: str, dst_uri: str) -> str | None:
    """Where the source QEMU sends the guest's memory: the destination's address taken
    from its libvirt URI (``qemu+tcp://kvm02/system`` -> ``tcp://kvm02``). A destination
    URI without a host is local to this process; when the source is local too (both
    hosts on one machine) that is loopback, otherwise libvirt picks the destination's
    own hostname (None)."""
    dst = urlsplit(dst_uri).hostname
    if dst:
        return f"tcp://[{dst}]" if _is_ipv6(dst) else f"tcp://{dst}"
    src = urlsplit(src_uri).hostname
    if not src or _is_loopback(src):
        return "tcp://127.0.0.1"
    return None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def migrate(src: Hypervisor, dst: Hypervisor, name: str, *, timeout: float, unsafe: bool,
            on_progress: Callable[[Progress], None] | None = None, poll: float = 0.5,
            stop: threading.Event | None = None, bandwidth_mib: int | None = None) -> Outcome:
    """Live-migrate ``name`` from ``src`` to ``dst`` within ``timeout`` seconds.

    ``unsafe``: the hosts share storage libvirt cannot recognise as shared (a local
    filesystem path both see, declared ``shared_storage`` in the configuration), so
    libvirt's refusal to move "unshared" disks is overridden (VIR_MIGRATE_UNSAFE).
    ``stop`` set from elsewhere aborts the migration like a timeout; ``bandwidth_mib``
    caps the transfer (MiB/s) so a migration leaves room on a shared link. Raises
    MigrationTimeout, or HypervisorError with libvirt's reason; in both cases the domain
    still runs on ``src``.
    """
    dom = src.lookup(name)
    flags = _FLAGS | (libvirt.VIR_MIGRATE_UNSAFE if unsafe else 0)
    params: dict[str, object] = {}
    uri = migration_uri(src.uri, dst.uri)
    if uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = uri
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            dom.migrate3(dst.conn, params, flags)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)

    started = time.monotonic()
    worker = threading.Thread(target=run, name=f"migrate-{name}", daemon=True)
    with src.errors(f"migrating to host {dst.name}", name):
        worker.start()
        aborted = _watch(dom, worker, started + timeout, on_progress, poll, stop)
    elapsed = time.monotonic() - started
    if failure:
        if aborted:
            why = "stopped" if stop is not None and stop.is_set() else f"did not finish within {timeout:.0f} s"
            raise MigrationTimeout(f"migration of {name!r} from host {src.name} to {dst.name} {why}: "
                                   f"aborted, the domain still runs on {src.name}") from failure[0]
        with src.errors(f"migrating to host {dst.name}", name):
            raise failure[0]
    log.info("domain %s: migrated from %s to %s in %.1f s", name, src.name, dst.name, elapsed)
    return Outcome(elapsed, _downtime(dst, name))


def _watch(dom: libvirt.virDomain, worker: threading.Thread, deadline: float,
           on_progress: Callable[[Progress], None] | None, poll: float, stop: threading.Event | None) -> bool:
    """Report progress until the migration thread ends; abort the job when time is up
    (or ``stop`` is set) and wait for the thread. True when we aborted."""
    aborted = False
    while worker.is_alive():
        if not aborted and (time.monotonic() > deadline or (stop is not None and stop.is_set())):
            try:
                dom.abortJob()
                aborted = True
            except libvirt.libvirtError as e:  # finished meanwhile, or not started yet: try again
                log.info("domain %s: abort of the migration answered: %s", dom.name(), e.get_error_message())
        if on_progress and not aborted:
            stats = _stats(dom)
            if stats is not None:
                on_progress(stats)
        worker.join(poll)
    return aborted


def _stats(dom: libvirt.virDomain) -> Progress | None:
    try:
        s = dom.jobStats(0)
    except libvirt.libvirtError:  # the domain left this host a moment ago
        return None
    if s.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    total = s.get("data_total") or s.get("memory_total") or 0
    return Progress(s.get("data_processed") or s.get("memory_processed") or 0, total,
                    s.get("data_remaining") or s.get("memory_remaining") or 0, s.get("time_elapsed", 0))


def _downtime(dst: Hypervisor, name: str) -> int | None:
    """The guest's pause at switch-over, from the destination's completed-job record."""
    try:
        stats = dst.lookup(name).jobStats(_COMPLETED)
    except (libvirt.libvirtError, VirtwardenError):
        return None
    value = stats.get("downtime")
    return int(value) if value is not None else None


def running_here(hv: Hypervisor, name: str) -> bool:
    """Whether ``name`` is defined and running on this host (False when absent)."""
    try:
        dom = hv.conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        with hv.errors("looking up domain", name):
            raise
    with hv.errors("reading state", name):
        return bool(dom.isActive())
