"""Restore drills: prove that a restore point boots, then leave nothing behind.

A drill restores a point (every artifact's SHA-256 verified first) into
``<scratch>/drill-<job id>/``, defines a throwaway domain ``virtwarden-drill-<first 8
characters of the job id>`` rebuilt from an allowlist of the domain XML saved with the
point (hypervisor.xml_allowlist: new name and UUID, no network or only the isolated
``virtwarden-drill`` network, only the restored disks, its serial console written to a
file in the drill's directory, a display reachable through libvirt only, no vsock, no
raw QEMU arguments, host devices, shared directories or memory, network character
devices or memory backing files; what was left out is logged and named in the
``starts`` check and the job's result; a fixed boot disk: see hypervisor.throwaway) and
starts it with libvirt's auto-destroy, so it is powered off the moment the worker's
connection closes. Then it polls every ``drill.poll_seconds`` (configuration):

- ``serial-marker``: when configured, the text must appear on the serial console;
- ``guest-agent``: when asked for, or when the saved XML has an agent channel, the
  guest agent must answer a guest-ping;
- ``stays-running``: the domain must run the whole time (a crash or power-off fails).

The first two are the evidence that the copy booted; each must show within
``boot_timeout`` seconds of the start. ``run_for`` counts from the moment the last of
them showed (from the start when there is nothing to watch), so a copy that boots slowly
on a busy host is not failed for it: the drill lasts the boot plus ``run_for``. Missing
evidence at ``boot_timeout`` ends the drill there.

Each check is recorded in the drill's catalog row as it completes ({name, ok, detail}),
with the restore time and the boot time (from the start until the marker showed, else
until the agent answered; with neither to watch, how long libvirt took to start it). Whatever happens, the
throwaway domain is powered off and undefined and the drill's files are deleted; the
row says whether that succeeded. A failed drill fails its job; the row keeps every check.

A worker that dies mid-drill leaves a domain (already powered off by auto-destroy) and
files. ``sweep`` removes everything named for a drill whose job is not running with a
live lease, and every drill runs it first, so the attempt that takes over the job (and
any later drill on the host) cleans up after the dead one. Only what a drill row of this
catalog names is touched; another installation's drills on the same host are not.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from virtwarden.catalog import drills, points
from virtwarden.catalog.drills import DrillView
from virtwarden.catalog.points import PointView
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor.types import Hypervisor
from virtwarden.tasks.confine import IMAGE_DIR
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.restore import RestoreRequest, resolve_point, run_restore

from virtwarden.errors import (
    ChecksumMismatch,
    HypervisorError,
    JobFailed,
    RestorePointNotFound,
    Transient,
    VirtwardenError,
)

log = logging.getLogger(__name__)

PREFIX = "virtwarden-drill-"
NETWORKS = ("none", "isolated")
_RESTORE_SHARE, _WATCH_SHARE = 0.5, 0.45  # of the job's progress


@dataclass(frozen=True)
class DrillRequest:
    """What to drill and how. The scheduler and event triggers send only ``domain`` and
    ``policy``; virtwarden.submit.drill settles the rest from the policy."""

    domain: str
    policy: str | None = None
    point: str = "latest"  # latest | oldest (the oldest complete point) | a point id
    storage: str | None = None  # with latest/oldest: only points on this target
    run_for: float = 60.0
    boot_timeout: float = 300.0
    serial_marker: str | None = None
    expect_agent: bool = False
    network: str = "none"  # none | isolated


def throwaway_name(job_id: str) -> str:
    return PREFIX + job_id[:8]


def drill_dir(scratch_root: Path, job_id: str) -> Path:
    return scratch_root / f"drill-{job_id}"


def pick_point(cat: Catalog, domain: str, point: str, storage: str | None = None) -> PointView:
    """``latest``, ``oldest`` (the oldest complete point: the longest chain still kept)
    or a point id of ``domain``."""
    if point != "oldest":
        return resolve_point(cat, domain, point, storage)
    usable = points.for_domain(cat, domain, storage=storage, statuses=(points.COMPLETE,))
    if not usable:
        raise RestorePointNotFound(f"domain {domain!r} has no complete restore point"
                                   + (f" on storage {storage!r}" if storage else ""))
    return usable[0]


def check_request(req: DrillRequest) -> None:
    if req.network not in NETWORKS:
        raise VirtwardenError(f"drill network {req.network!r}: one of {', '.join(NETWORKS)}")
    if req.run_for <= 0:
        raise VirtwardenError(f"drill run_for must be above 0 seconds, not {req.run_for}")
    if req.boot_timeout <= 0:
        raise VirtwardenError(f"drill boot_timeout must be above 0 seconds, not {req.boot_timeout}")


def run_drill(ctx: JobContext, req: DrillRequest) -> dict:
    check_request(req)
    hv = ctx.require_hypervisor()
    sweep(hv, ctx.catalog, ctx.scratch_root, own=ctx.job_id)
    point = pick_point(ctx.catalog, req.domain, req.point, req.storage)
    row = drills.begin(ctx.catalog, drill_id=ctx.job_id, domain=req.domain, host=hv.name, point_id=point.id,
                       throwaway=throwaway_name(ctx.job_id))
    log.info("drill %s: point %s of %s as %s on host %s", ctx.job_id, point.id, req.domain, row.throwaway, hv.name)
    run = _Run(ctx, hv, req, point, row)
    try:
        run.execute()
    except Transient as e:
        _ended_early(ctx.catalog, row, f"attempt {ctx.attempt}: {e} (the job is tried again)")
        raise
    except BaseException as e:  # a bug, or the job's lease lost to another worker
        _ended_early(ctx.catalog, row, f"interrupted: {str(e) or type(e).__name__}")
        raise
    finally:
        cleanup_error = run.clean_up()
    return run.outcome(cleanup_error)


def _ended_early(cat: Catalog, row: DrillView, why: str) -> None:
    try:
        drills.finish(cat, row, passed=False, error=why)
    except VirtwardenError as e:  # the catalog is down too: the sweep marks the row later
        log.warning("drill %s: could not record that it ended early (%s): %s", row.id, why, e)


class _Run:
    """One attempt of one drill; ``checks`` grows as the drill goes."""

    def __init__(self, ctx: JobContext, hv: Hypervisor, req: DrillRequest, point: PointView, row: DrillView) -> None:
        self.ctx, self.hv, self.req, self.point, self.row = ctx, hv, req, point, row
        self.dir = drill_dir(ctx.scratch_root, ctx.job_id)
        self.name = throwaway_name(ctx.job_id)
        self.checks: list[dict] = []
        self.restore_seconds: float | None = None
        self.boot_seconds: float | None = None
        self.uuid: str | None = None
        self.defining = False
        self.started = self.start_seconds = 0.0
        self.xml = ""  # the throwaway's definition, once built
        self.dropped: list[str] = []  # what of the saved XML it left out

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"name": name, "ok": ok, "detail": detail})
        drills.record(self.ctx.catalog, self.row, checks=self.checks, restore_seconds=self.restore_seconds,
                      boot_seconds=self.boot_seconds)
        log.info("drill %s: %s %s: %s", self.ctx.job_id, name, "ok" if ok else "FAILED", detail)
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)

    def execute(self) -> None:
        restored = self._restore()
        if restored is None:
            return
        disks, saved_xml = restored
        if self._start(disks, saved_xml):
            self._watch()
        drills.finish(self.ctx.catalog, self.row, passed=self.passed,
                      error=None if self.passed else _failed_summary(self.checks))

    # --- restore ----------------------------------------------------------------------
    def _restore(self) -> tuple[dict[str, str], str] | None:
        ctx = self.ctx
        self.dir.mkdir(parents=True, exist_ok=True)
        sub = replace(ctx, report=lambda f, text: ctx.report(_RESTORE_SHARE * f, f"restoring: {text}"))
        start = time.monotonic()
        try:
            # Into the drill's own scratch directory, which QEMU must be able to reach.
            result = run_restore(sub, RestoreRequest(self.req.domain, self.point.id, to_dir=str(self.dir / "disks"),
                                                     confined=False), dir_mode=IMAGE_DIR)
        except ChecksumMismatch as e:
            self.check("checksums", False, str(e))
            drills.finish(ctx.catalog, self.row, passed=False, error=_failed_summary(self.checks))
            return None
        except Transient:
            raise
        except VirtwardenError as e:
            self.check("restore", False, str(e))
            drills.finish(ctx.catalog, self.row, passed=False, error=_failed_summary(self.checks))
            return None
        self.restore_seconds = round(time.monotonic() - start, 3)
        chain = [points.get(ctx.catalog, p) for p in result["chain"]]
        count = sum(len(p.artifacts) for p in chain)
        self.check("checksums", True, f"{count} artifact(s) of {len(chain)} restore point(s) match their SHA-256")
        disks = {Path(p).stem: p for p in result["disks"]}
        self.check("restore", True, f"{', '.join(sorted(disks))} restored in {self.restore_seconds:.1f} s")
        return disks, (self.dir / "disks" / "domain.xml").read_text()

    # --- boot -------------------------------------------------------------------------
    def _start(self, disks: dict[str, str], saved_xml: str) -> bool:
        from virtwarden.hypervisor import domains, networks
        from virtwarden.hypervisor.domxml import CopySpec, copy_domain
        from virtwarden.hypervisor.throwaway import fixed_boot_order, interfaces
        from virtwarden.hypervisor.xml_allowlist import public_boot_files

        nics = interfaces(saved_xml)
        try:
            isolated = self.req.network == "isolated" and nics > 0
            network = networks.ensure_isolated(self.hv) if isolated else None
            spec = CopySpec(self.name, disks=disks, drop_interfaces=network is None, network=network,
                            serial_log=str(self.serial_path), throwaway=True,
                            host_files=public_boot_files(saved_xml))
            copy = copy_domain(saved_xml, spec)
            self.xml = fixed_boot_order(copy.xml)
            self.dropped = list(copy.dropped)
            if copy.dropped:
                log.warning("drill %s: left out of the saved domain XML of %s: %s", self.ctx.job_id, self.req.domain,
                            "; ".join(copy.dropped))
            self.defining = True
            domains.define(self.hv, self.xml, self.name)
            self.uuid = self.hv.domain(self.name).uuid
            self.ctx.report(_RESTORE_SHARE, f"starting {self.name}")
            asked = time.monotonic()
            domains.start(self.hv, self.name, autodestroy=True)
        except Transient:
            raise
        except VirtwardenError as e:
            return self.check("starts", False, str(e) + _left_out(self.dropped))
        self.started = time.monotonic()
        self.start_seconds = self.started - asked
        where = (f"{nics} interface(s) on isolated network {network}" if network
                 else "no network" + (f" ({nics} interface(s) removed)" if nics else ""))
        return self.check("starts", True, f"{self.name} started ({where})" + _left_out(self.dropped))

    @property
    def serial_path(self) -> Path:
        return self.dir / "serial.log"

    def _watch(self) -> None:
        from virtwarden.hypervisor import agent, domains
        from virtwarden.hypervisor.throwaway import has_agent_channel

        req = self.req
        marker = req.serial_marker.encode() if req.serial_marker else None
        want_agent = req.expect_agent or has_agent_channel(self.xml)  # the channel the copy has, not the saved one
        console = _Console(self.serial_path)
        marker_at = agent_at = stopped_at = None
        stopped_state = ""
        watched = bool(marker) or want_agent
        booted_at = None if watched else self.started  # run_for counts from here
        boot_deadline = self.started + req.boot_timeout
        while True:
            now = time.monotonic()
            if marker and marker_at is None and console.contains(marker):
                marker_at = now - self.started
            if not domains.is_running(self.hv, self.name):
                stopped_at, stopped_state = now - self.started, self.hv.domain(self.name).state
                break
            if want_agent and agent_at is None and agent.ping(self.hv, self.name,
                                                                   self.ctx.drill.agent_ping_seconds):
                agent_at = time.monotonic() - self.started
            if booted_at is None and (not marker or marker_at is not None) and (not want_agent or agent_at is not None):
                booted_at = time.monotonic()
            now = time.monotonic()
            deadline = boot_deadline if booted_at is None else booted_at + req.run_for
            if now >= deadline:
                break
            total = (boot_deadline if booted_at is None else booted_at) - self.started + req.run_for
            self.ctx.report(_RESTORE_SHARE + _WATCH_SHARE * min(1.0, (now - self.started) / total),
                            f"{self.name} up for {now - self.started:.0f} s"
                            + (f", {now - booted_at:.0f} of {req.run_for:g} s since it booted" if booted_at
                               else f", waiting up to {req.boot_timeout:g} s for it to boot"))
            time.sleep(max(0.0, min(self.ctx.drill.poll_seconds, deadline - time.monotonic())))
        waited = time.monotonic() - self.started
        if marker:
            self.boot_seconds = _round(marker_at)
        elif want_agent:
            self.boot_seconds = _round(agent_at)
        else:  # nothing in the guest to observe: how long libvirt took to start it
            self.boot_seconds = _round(self.start_seconds)
        since = " since it booted" if watched else ""
        if stopped_at is not None:
            self.check("stays-running", False, f"{stopped_state} after {stopped_at:.1f} s"
                       + (f" ({self.started + stopped_at - booted_at:.1f} of {req.run_for:g} s{since})"
                          if booted_at else ", before it showed that it booted"))
        elif booted_at is not None:
            self.check("stays-running", True, f"running for {req.run_for:g} s{since}")
        else:
            self.check("stays-running", True, f"running for {waited:.1f} s without showing that it booted")
        if marker:
            if marker_at is not None:
                self.check("serial-marker", True,
                           f"{req.serial_marker!r} on the serial console after {marker_at:.1f} s")
            else:
                self.check("serial-marker", False, f"{req.serial_marker!r} not on the serial console within"
                                                   f" {waited:.1f} s (boot_timeout {req.boot_timeout:g} s);"
                                                   f" {console.tail()}")
        if want_agent:
            why = "expected by the policy" if req.expect_agent else "the domain has an agent channel"
            if agent_at is not None:
                self.check("guest-agent", True, f"answered guest-ping after {agent_at:.1f} s ({why})")
            else:
                self.check("guest-agent", False, f"no answer to guest-ping within {waited:.1f} s ({why};"
                                                 f" boot_timeout {req.boot_timeout:g} s)")

    # --- the end ----------------------------------------------------------------------
    def clean_up(self) -> str | None:
        """Power off and undefine the throwaway (if it is ours: same UUID), delete the
        drill's files; record the outcome. Returns what could not be cleaned, or None."""
        from virtwarden.hypervisor import domains

        problems = []
        try:
            if self.defining and _ours(self.hv, self.name, self.uuid):
                domains.remove(self.hv, self.name)
        except VirtwardenError as e:
            problems.append(f"throwaway domain {self.name} not removed: {e}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ctx.clear_scratch()
        if self.dir.exists():
            problems.append(f"{self.dir} could not be deleted")
        error = "; ".join(problems) or None
        try:
            drills.cleaned(self.ctx.catalog, self.row, error is None, error and f"clean-up: {error}")
        except VirtwardenError as e:  # the catalog is down: the sweep fixes the flag later
            log.warning("drill %s: clean-up not recorded: %s", self.ctx.job_id, e)
        return error

    def outcome(self, cleanup_error: str | None) -> dict:
        view = drills.get(self.ctx.catalog, self.row.id)
        if not self.passed:
            raise JobFailed(f"drill of {self.req.domain} failed: {_failed_summary(self.checks)}"
                            + (f"; clean-up: {cleanup_error}" if cleanup_error else ""))
        if cleanup_error:
            raise HypervisorError(f"drill of {self.req.domain} passed but its clean-up failed: {cleanup_error}")
        self.ctx.report(1.0, "passed")
        return {**view.to_json(), "passed": True, "request": asdict(self.req), "left_out_of_xml": self.dropped}


def _failed_summary(checks: list[dict]) -> str:
    return "; ".join(f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]) or "no check ran"


def _left_out(dropped: list[str], shown: int = 8) -> str:
    """What the copy left out of the saved XML, without the reasons, for a check's
    detail (the job's result and the log have the whole list, with the reasons)."""
    if not dropped:
        return ""
    what = [item.split(": ", 1)[0] for item in dropped]
    more = f" and {len(what) - shown} more" if len(what) > shown else ""
    return f"; left out of the saved XML: {', '.join(what[:shown])}{more}"


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _ours(hv: Hypervisor, name: str, uuid: str | None) -> bool:
    """Whether ``name`` exists and is the domain this attempt defined (any, when the
    attempt failed before it learned the UUID)."""
    from virtwarden.errors import DomainNotFound

    try:
        found = hv.domain(name)
    except DomainNotFound:
        return False
    return uuid is None or found.uuid == uuid


class _Console:
    """Reads the serial log as it grows; finds a marker even across two reads."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.seen = path, 0, b""

    def contains(self, marker: bytes) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                new = f.read(1 << 20)
        except FileNotFoundError:
            return False
        self.offset += len(new)
        self.seen = (self.seen + new)[-(len(marker) + 4096):]
        return marker in self.seen

    def tail(self) -> str:
        text = self.seen[-80:].decode("utf-8", "replace").strip()
        text = "".join(ch if ch.isprintable() else " " for ch in text)
        return f"its last output: {text!r}" if text else "the serial console stayed empty"


# --- leftovers ----------------------------------------------------------------------------

def sweep(hv: Hypervisor, cat: Catalog, scratch_root: Path, *, own: str | None = None) -> list[str]:
    """Remove the throwaway domains (``virtwarden-drill-*``) and drill directories on
    this host that belong to drills of this catalog whose job is not running with a
    live lease (``own``, the caller's job, counts as not running: what its earlier
    attempt left is a leftover). Domains and directories no drill row of this catalog
    names (another installation's) are left alone. Marks the rows failed and cleaned.
    Returns what was removed; one leftover that cannot be removed is logged, not raised."""
    from virtwarden.hypervisor import domains

    names = domains.names(hv, PREFIX)
    dirs = {p.name[len("drill-"):]: p for p in scratch_root.glob("drill-*")} if scratch_root.is_dir() else {}
    live = drills.live_ids(cat) - {own}  # read after listing: anything newer is not touched
    owners = drills.by_throwaway(cat, names)
    known = drills.existing(cat, list(dirs))
    removed, problems = [], []
    for name in names:
        if not owners.get(name) or owners[name] & live:
            continue
        try:
            domains.remove(hv, name)
            removed.append(f"domain {name}")
        except VirtwardenError as e:
            problems.append(str(e))
    for job_id, path in sorted(dirs.items()):
        if job_id in live or job_id not in known:
            continue
        for leftover in (path, scratch_root / f"job-{job_id}"):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                (problems if leftover.exists() else removed).append(str(leftover))
    dead = drills.abandon_dead(cat, hv.name, "its worker stopped before the drill ended")
    if problems:
        log.warning("host %s: drill leftovers not removed: %s", hv.name, "; ".join(problems))
    else:
        drills.mark_cleaned(cat, [d for d in dead + drills.unclean(cat, hv.name) if d not in live and d != own])
    if removed:
        log.info("host %s: removed drill leftovers: %s", hv.name, ", ".join(removed))
    return removed
