"""The one module that imports libvirt.

``LibvirtHost`` wraps one connection to one host and speaks in the plain values of
``hypervisor.types``. Every libvirt error is converted here, where it happens, into a
product error whose message says what failed and on which domain and host.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt
from virtwarden.hypervisor import events, liveness, qemu_img
from virtwarden.hypervisor.types import Checkpoint, Disk, DomainInfo, HostVersion, JobState

from virtwarden.errors import (
    BackupUnsupported,
    CheckpointMissing,
    DomainNotFound,
    HypervisorError,
    HypervisorUnavailable,
    ToolFailed,
)
from virtwarden.redact import mask

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
_said_no_loop: list[bool] = []  # the warning that keepalive is off here was logged
_CHECKPOINT_GONE = (
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
    getattr(libvirt, "VIR_ERR_CHECKPOINT_INCONSISTENT", -1),
)


class LibvirtHost:
    """One libvirt connection. Open per job (connections must not cross a fork).

    libvirt waits for ever on a libvirtd that stopped answering (SIGSTOPped, hung, or
    behind a dropped network path: its socket still accepts). So opening gives up after
    the process's ``Liveness.open_timeout``, and an open connection has keepalive on:
    libvirt's event loop (hypervisor.events) probes a silent libvirtd and closes the
    connection after ``keepalive_count`` unanswered probes, failing the call that waits
    on it as ``HypervisorUnavailable`` (transient: a job is retried). ``keepalive=False``
    is for a process that forks after using the connection (the worker before its pool
    starts): the loop must not run in it."""

    def __init__(self, name: str, uri: str, *, keepalive: bool = True) -> None:
        self.name, self.uri = name, uri
        self.shown_uri = mask(uri)  # for messages: a URI may carry a password
        self.keepalive = keepalive
        self._conn: libvirt.virConnect | None = None

    # --- connection ---------------------------------------------------------------
    def open(self) -> LibvirtHost:
        wanted = liveness()
        loop = self.keepalive and events.start_loop()  # before the connection, or keepalive cannot start
        if self.keepalive and not loop and not _said_no_loop:
            _said_no_loop.append(True)  # once per process
            log.warning("libvirt's event loop started in this process's parent before it forked: connections "
                        "opened here have no keepalive, and a hung libvirtd holds a call until it answers")
        conn = events.connect_within(self.name, self.uri, wanted.open_timeout)
        if loop:
            try:
                conn.setKeepAlive(wanted.keepalive_interval, wanted.keepalive_count)
            except libvirt.libvirtError as e:  # a driver without keepalive (test:///): nothing to probe
                log.debug("host %s: no keepalive on %s: %s", self.name, self.shown_uri, e.get_error_message())
        self._conn = conn
        return self

    def close(self) -> None:
        if self._conn is not None:
            with suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> LibvirtHost:
        return self.open() if self._conn is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    @contextmanager
    def errors(self, what: str, domain: str | None = None) -> Iterator[None]:
        """Convert libvirt errors raised inside the block into product errors."""
        try:
            yield
        except libvirt.libvirtError as e:
            code, msg = e.get_error_code(), e.get_error_message()
            where = f"domain {domain!r} on host {self.name}" if domain else f"host {self.name}"
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(f"no domain {domain!r} on host {self.name} ({self.shown_uri})") from e
            if code in _CHECKPOINT_GONE:
                raise CheckpointMissing(f"{what} on {where}: {msg}") from e
            if not self._alive():  # whatever the code says ("End of file while reading data", ...)
                raise HypervisorUnavailable(f"{what} on {where}: connection to {self.shown_uri} lost: {msg}") from e
            raise HypervisorError(f"{what} on {where}: {msg}") from e

    def _alive(self) -> bool:
        try:
            return bool(self._conn and self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def version(self) -> HostVersion:
        with self.errors("reading versions"):
            lib = self.conn.getLibVersion()
            hv = self.conn.getVersion()
            caps = ET.fromstring(self.conn.getCapabilities())
            types = sorted({d.get("type", "") for d in caps.iter("domain")})
            backup = False
            for virt in types:
                try:
                    dc = ET.fromstring(self.conn.getDomainCapabilities(None, None, None, virt, 0))
                except libvirt.libvirtError:
                    continue
                node = dc.find("./features/backup")
                backup = backup or (node is not None and node.get("supported") == "yes")
        return HostVersion(_ver(lib), _ver(hv), backup, tuple(t for t in types if t))

    def qemu_user(self, domain: str | None = None) -> tuple[int, int] | None:
        """The uid and gid QEMU runs as on this host (libvirt's DAC base label, from
        qemu.conf's user and group), or None when libvirt does not say. With ``domain``
        (running), that domain's QEMU: its own DAC label when its XML has one (a
        per-domain ``<seclabel model='dac'>``), else the host's."""
        if domain is not None:
            with self.errors("reading domain XML", domain):
                found = domain_qemu_user(ET.fromstring(self.lookup(domain).XMLDesc(0)))
            if found is not None:
                return found
        with self.errors("reading capabilities"):
            caps = ET.fromstring(self.conn.getCapabilities())
        return qemu_user_from(caps)

    # --- domains ----------------------------------------------------------------------
    def lookup(self, name: str) -> libvirt.virDomain:
        with self.errors("looking up domain", name):
            return self.conn.lookupByName(name)

    def domain(self, name: str, *, sizes: bool = True) -> DomainInfo:
        """The domain's state, disks and XML. Without ``sizes`` its disks' sizes are not
        asked for (0): one call fewer per disk, and no query of QEMU's block nodes (which
        QEMU 7.2 may not survive during a backup's start, see ``begin_backup``)."""
        dom = self.lookup(name)
        with self.errors("reading domain", name):
            return self._info(dom, sizes=sizes)

    def domains(self, *, sizes: bool = True) -> list[DomainInfo]:
        """Every domain of the host. libvirt lists them, then each is read: one undefined
        in between (a drill's guest, a transient domain that stopped, another tool's) is
        left out, as it is no longer there, instead of failing the whole listing."""
        found = []
        with self.errors("listing domains"):
            for dom in self.conn.listAllDomains():
                try:
                    found.append(self._info(dom, sizes=sizes))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
        return found

    def domain_names(self) -> list[str]:
        """The names of every domain: one call (``domains`` makes several per domain)."""
        with self.errors("listing domains"):
            return [d.name() for d in self.conn.listAllDomains()]

    def _info(self, dom: libvirt.virDomain, *, sizes: bool = True) -> DomainInfo:
        state = _STATES.get(dom.state()[0], "unknown")
        xml = dom.XMLDesc(0)
        disks = []
        for d in _disks(xml):
            size = 0
            with suppress(libvirt.libvirtError):
                size = dom.blockInfo(d.target)[0] if sizes else 0
            disks.append(Disk(d.target, d.path, d.format, d.source_type, size))
        return DomainInfo(dom.name(), dom.UUIDString(), state, bool(dom.isPersistent()), tuple(disks), xml)

    def inactive_xml(self, name: str, *, secure: bool = False) -> str:
        """The persistent definition (the live one of a transient domain). Without
        ``secure`` libvirt leaves secrets out (graphics passwords): that is what a
        manifest records. Only a definition given back to libvirt for the same domain
        (a restore in place) is read with them, or the domain would lose its password."""
        dom = self.lookup(name)
        with self.errors("reading domain XML", name):
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
            return dom.XMLDesc(flags | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0))

    # --- checkpoints ------------------------------------------------------------------
    def checkpoints(self, name: str) -> list[Checkpoint]:
        dom = self.lookup(name)
        with self.errors("listing checkpoints", name):
            return [_checkpoint(c.getXMLDesc(0)) for c in dom.listAllCheckpoints(0)]

    def checkpoint_xml(self, name: str, checkpoint: str) -> str:
        """The checkpoint's XML with its <domain>, as REDEFINE needs it later."""
        dom = self.lookup(name)
        with self.errors(f"reading checkpoint {checkpoint}", name):
            return dom.checkpointLookupByName(checkpoint).getXMLDesc(0)

    def delete_checkpoint(self, name: str, checkpoint: str, *, metadata_only: bool = False) -> None:
        dom = self.lookup(name)
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        with self.errors(f"deleting checkpoint {checkpoint}", name):
            try:
                dom.checkpointLookupByName(checkpoint).delete(flags)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    raise

    def redefine_checkpoint(self, name: str, xml: str, *, validate: bool = True) -> None:
        """Recreate a checkpoint's metadata from its XML; with ``validate`` libvirt accepts
        it only when its bitmaps are present and consistent in every disk."""
        dom = self.lookup(name)
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        if validate:
            flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        with self.errors("redefining checkpoint", name):
            dom.checkpointCreateXML(xml, flags)

    # --- backup jobs ------------------------------------------------------------------
    def begin_backup(self, name: str, targets: dict[str, str], *, checkpoint: str,
                     incremental_from: str | None, bitmap_disks: set[str], skip: set[str],
                     pull_socket: str | None = None) -> None:
        """Start a push-mode backup of ``targets`` (disk -> new qcow2 file) that creates
        ``checkpoint`` atomically with it; disks without bitmaps are copied in full.

        With ``pull_socket``, a pull-mode backup instead: QEMU serves each disk as it was
        when the backup began over NBD on that Unix socket (export name: the disk's
        target; an incremental's changes in the metadata context
        ``qemu:dirty-bitmap:backup-<target>``), ``targets`` are the scratch images it
        keeps the old data of blocks the guest overwrites meanwhile in, and the backup
        runs until ``abort_job``.

        The target images are made here with qemu-img, the size and cluster size of the
        disk, and handed to libvirt as existing files (REUSE_EXTERNAL). Left to libvirt,
        QEMU creates them with a blockdev-create job, and QEMU 7.2 (Debian 12) aborts,
        killing the guest, when anything reads the domain's block nodes while that job
        runs (qcow2_get_specific_info's assertion on a half-opened image): a
        ``virDomainGetBlockInfo`` or bulk-stats call from our scheduler or listener, or
        from any monitoring agent on the host. An existing image is opened by
        blockdev-add, a monitor command nothing runs beside."""
        dom = self.lookup(name)
        with self.errors("reading domain XML", name):
            actives = {d.target: d for d in _disks(dom.XMLDesc(0))}
        for target, dest in targets.items():
            disk = actives.get(target)
            if disk is None:
                raise HypervisorError(f"domain {name!r} on host {self.name} has no disk {target}")
            with self.errors(f"reading the size of disk {target}", name):
                size = dom.blockInfo(target)[0]
            cluster = None  # qcow2's default, 64 KiB, unless the disk's own can be read
            if disk.format == "qcow2":
                with suppress(ToolFailed):
                    cluster = qemu_img.info(Path(disk.path)).get("cluster-size")
            qemu_img.create(Path(dest), size, cluster_size=cluster)
        inc = f"<incremental>{escape(incremental_from)}</incremental>" if incremental_from else ""
        disks = []
        image = "scratch" if pull_socket else "target"
        for target, dest in targets.items():
            mode = "" if target in bitmap_disks or not incremental_from else " backupmode='full'"
            disks.append(f"<disk name='{target}' backup='yes' type='file'{mode}>"
                         f"<driver type='qcow2'/><{image} file='{escape(dest)}'/></disk>")
        disks += [f"<disk name='{t}' backup='no'/>" for t in sorted(skip)]
        server = f"<server transport='unix' socket='{escape(pull_socket)}'/>" if pull_socket else ""
        backup_xml = (f"<domainbackup mode='{'pull' if pull_socket else 'push'}'>{inc}{server}"
                      f"<disks>{''.join(disks)}</disks></domainbackup>")
        cp_disks = "".join(
            f"<disk name='{t}' checkpoint='{'bitmap' if t in bitmap_disks else 'no'}'/>"
            for t in sorted(set(targets) | skip))
        cp_xml = (f"<domaincheckpoint><name>{escape(checkpoint)}</name>"
                  f"<description>created by virtwarden</description><disks>{cp_disks}</disks></domaincheckpoint>")
        with self.errors("starting backup", name):
            try:
                dom.backupBegin(backup_xml, cp_xml, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
            except libvirt.libvirtError as e:
                if e.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                    raise BackupUnsupported(
                        f"host {self.name} cannot run libvirt backups of {name!r}: {e.get_error_message()}"
                    ) from e
                raise

    def backup_state(self, name: str) -> JobState:
        """The running backup's progress, or how the last one ended."""
        dom = self.lookup(name)
        with self.errors("reading job state", name):
            stats = dom.jobStats(0)
            if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
                return JobState(True, None, stats.get("disk_processed", 0), stats.get("disk_total", 0))
            flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
            done = dom.jobStats(flags)
        ok = done.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED and done.get("success", True)
        if done.get("operation") not in (None, libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP):
            return JobState(False, False, 0, 0, "the last domain job was not a backup")
        return JobState(False, bool(ok), done.get("disk_processed", 0), done.get("disk_total", 0),
                        None if ok else (done.get("errmsg") or "libvirt reports the backup job failed"))

    def has_active_job(self, name: str) -> bool:
        dom = self.lookup(name)
        with self.errors("reading job state", name):
            return dom.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE

    def backup_job_running(self, name: str) -> bool:
        """Whether the domain's active job is a backup (libvirt keeps one that was
        running when libvirtd restarted: it recovers it from QEMU)."""
        dom = self.lookup(name)
        with self.errors("reading job state", name):
            stats = dom.jobStats(0)
        return (stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
                and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)

    def abort_job(self, name: str) -> None:
        dom = self.lookup(name)
        with self.errors("aborting job", name):
            try:
                dom.abortJob()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job running
                    raise


# --- XML parsing (pure) -------------------------------------------------------------
def qemu_user_from(caps: ET.Element) -> tuple[int, int] | None:
    """``<secmodel><model>dac</model><baselabel type='kvm'>+64055:+994</baselabel>``."""
    for model in caps.iterfind("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        labels = {b.get("type"): (b.text or "") for b in model.iterfind("baselabel")}
        return _dac_ids(labels.get("kvm") or labels.get("qemu") or next(iter(labels.values()), ""))
    return None


def domain_qemu_user(domain: ET.Element) -> tuple[int, int] | None:
    """A running domain's ``<seclabel model='dac'><label>+64055:+994</label>`` (libvirt
    writes the label it runs QEMU with into the live XML); None without one."""
    for seclabel in domain.iterfind("./seclabel"):
        if seclabel.get("model") == "dac" and seclabel.findtext("label"):
            return _dac_ids(seclabel.findtext("label") or "")
    return None


def _dac_ids(label: str) -> tuple[int, int] | None:
    """``+64055:+994`` (ids) or ``libvirt-qemu:kvm`` (names, looked up here)."""
    import grp
    import pwd

    user, _, group = label.partition(":")
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return uid, gid


def _disks(xml: str) -> list[Disk]:
    """The domain's disk devices that hold data we can copy (file or block sources)."""
    out = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        kind = disk.get("type", "file")
        if target is None or source is None or kind not in ("file", "block"):
            continue
        path = source.get("file") if kind == "file" else source.get("dev")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        out.append(Disk(target.get("dev", ""), path or "", fmt, kind))
    return out


def _checkpoint(xml: str) -> Checkpoint:
    root = ET.fromstring(xml)
    parent = root.findtext("./parent/name")
    disks = tuple(d.get("name", "") for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap")
    return Checkpoint(root.findtext("name") or "", parent, int(root.findtext("creationTime") or 0), disks, xml)


def _ver(n: int) -> str:
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"
