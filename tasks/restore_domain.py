"""Restores that end in a domain: as a new domain, or in place of the domain's disks.

As a new domain (``run_restore_as_domain``): the point's disks are rebuilt as
``<dir>/<name>-<target>.qcow2`` (see tasks/restore_plan.py for ``<dir>``), and a domain
is defined from the XML saved with the point, rebuilt from an allowlist
(``domxml.copy_domain``, hypervisor.xml_allowlist): the saved XML comes from storage
and is not trusted. The copy gets the new name, a new UUID, new MAC addresses, each
restored disk on its image (a blockcommit point's XML names the change-tracking overlay
as the disk's source; it is replaced like any other source) and no other disk, a
file-backed serial console moved to a log of its own, its own UEFI variable store, a
display reachable through libvirt only and sockets libvirt places, so it can run next
to the original. It keeps its interfaces on libvirt networks and bridges (the operator
asked for a working clone) but nothing that reaches the host otherwise: no raw QEMU
arguments, host devices, shared directories or memory, network character devices,
memory backing files or fixed vsock CIDs. What was left out is logged and listed in the
job's result (``left_out_of_xml``). It is refused when a file (or a symbolic link) or a
domain of that name exists. The images are created exclusively, 0600, and named only
once complete; a missing directory is created 0711, so that QEMU running as another
user can reach them (tasks/confine.py). A ``disk_dir`` asked for through the API or a
runbook must be under restore.allowed_dirs. On any failure nothing is left: images
written are removed and the domain, if defined, is removed again.

In place (``run_restore_in_place``): the restored images are rebuilt first, in the
format each disk has now (qcow2 stays qcow2, raw stays raw, so the definition keeps its
driver types), under temporary names beside the images they replace, while the domain
still runs. Only then is it shut off (a clean shutdown, then power-off after the
timeout) and the images swapped by renames (tasks/disk_swap.py): the current images go
aside as ``<image>.before-restore-<time>``. A disk running on one of our blockcommit
change-tracking overlays is restored into its own image below it, the overlay goes
aside with it, and the definition is updated to the image alone. Each step is journaled
first (``disk_swap.SwapJournal``), and every step outside the catalog is taken only after
proving the attempt still owns the job (``JobContext.ensure_owner``).

Until the journal says the swap is done, any failure puts the original images and
definition back and starts the domain again if it was running; an attempt that loses
its job stops where it is and leaves that to the next attempt, which (like the recovery
of a job that gives up, ``recover_in_place``) finds the journal and puts everything back
first. Once the journal says the swap is done, the restore stands: whichever attempt
comes next finishes it and never rebuilds, renames or discards anything again.
Finishing means: start the domain if asked (unless it runs already), delete
virtwarden's checkpoints that existed at the swap (metadata only: their bitmaps were in
the images set aside), so the next backup is a full of a new chain and says why, and
keep the set-aside images (listed in the result) or delete them with ``discard_old``.
"""
from __future__ import annotations

import logging
import os
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path

from virtwarden.catalog import jobs
from virtwarden.catalog import overlays as overlay_journal
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor import domains, qemu_img, snapshots
from virtwarden.hypervisor.blockjobs import live_chains
from virtwarden.hypervisor.domxml import CopySpec, carry_passwords, copy_domain, redact, repoint_disks
from virtwarden.hypervisor.types import DomainInfo, Hypervisor
from virtwarden.hypervisor.xml_allowlist import public_boot_files
from virtwarden.storage_backends.base import Backend
from virtwarden.tasks import disk_swap
from virtwarden.tasks.confine import IMAGE_DIR, NewDir, confine
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.restore import (
    Chain,
    RestoreRefused,
    fetched,
    layers_for,
    load_chain,
    rebuild,
    rebuild_new,
    resolve_point,
)
from virtwarden.tasks.restore_plan import (
    AS_DOMAIN,
    IN_PLACE,
    Destination,
    LiveDisk,
    LiveDomain,
    RestorePlan,
    check_paths,
    human_size,
    plan_restore,
)

from virtwarden import faults
from virtwarden.errors import (
    HypervisorError,
    JobNotFound,
    LeaseLost,
    LockHeld,
    NoSpace,
    ToolFailed,
    Transient,
    VirtwardenError,
)

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT = 120.0  # seconds a guest gets to shut down cleanly before it is powered off


@dataclass(frozen=True)
class AsDomainRequest:
    domain: str  # the backed-up domain
    point: str  # a point id, or "latest"
    as_domain: str  # the new domain's name
    uuid: str | None = None  # the new domain's UUID (default: a random one)
    disk_dir: str | None = None  # default: beside the original's images
    start: bool = False
    storage: str | None = None
    # disk_dir must be under the worker's restore.allowed_dirs (tasks/confine.py); False
    # only for a restore root started from the command line.
    confined: bool = True


@dataclass(frozen=True)
class InPlaceRequest:
    domain: str
    point: str
    discard_old: bool = False
    start: bool = False
    storage: str | None = None
    shutdown_timeout: float = SHUTDOWN_TIMEOUT


def inspect_live(cat: Catalog, info: DomainInfo, *, managed_save: bool = False,
                 snapshots: tuple[str, ...] = ()) -> LiveDomain:
    """The domain as a restore in place sees it: for each disk, its own image (below the
    blockcommit change-tracking overlays of ours that the journal knows) and that
    image's format."""
    ours = {r.overlay_path: r for r in overlay_journal.open_for_domain(cat, info.name)}
    chains = live_chains(info.xml)
    disks = []
    for d in info.disks:
        replaces, fmt = [d.path], d.format
        while replaces[-1] in ours and len(replaces) < 64:
            below, fmt = _below(replaces[-1], chains.get(d.target, ()), ours[replaces[-1]].base_path)
            replaces.append(below)
        disks.append(LiveDisk(d.target, replaces[-1], fmt, d.source_type, tuple(replaces)))
    return LiveDomain(info.name, info.uuid, info.state, info.persistent, tuple(disks), managed_save, snapshots)


def inspect_host(cat: Catalog, hv: Hypervisor, name: str) -> LiveDomain:
    info = hv.domain(name)
    saved = not info.active and info.persistent and domains.has_managed_save(hv, name)
    return inspect_live(cat, info, managed_save=saved, snapshots=tuple(snapshots.names(hv, name)))


def _below(overlay: str, chain: tuple, journaled: str) -> tuple[str, str]:
    """The image under one of our overlays and its format: from the running domain's
    chain, else from the overlay's own header (the journal's base may have been merged
    away since), else the journal's word with the format unknown."""
    layers = [layer.path for layer in chain]
    if overlay in layers and layers.index(overlay) + 1 < len(layers):
        below = chain[layers.index(overlay) + 1]
        if below.format:
            return below.path, below.format
    try:
        head = qemu_img.info(Path(overlay))
        backing = head.get("full-backing-filename") or head.get("backing-filename")
        if backing:
            return str(backing), str(head.get("backing-filename-format", ""))
    except (ToolFailed, OSError, ValueError):
        pass
    return journaled, ""


def check_space(plan: RestorePlan) -> None:
    """Room for the new images beside the old ones: about the bytes read, per directory."""
    need: dict[Path, int] = {}
    for d in plan.disks:
        where = _existing_parent(Path(d.path))
        need[where] = need.get(where, 0) + d.read_bytes
    for where, size in need.items():
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise NoSpace(f"{where} has {human_size(free)} free; the restored images need about "
                          f"{human_size(size)} (nothing was changed)")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def _start_scratch(ctx: JobContext) -> None:
    ctx.clear_scratch()
    ctx.scratch.mkdir(parents=True)


def _rebuild_all(ctx: JobContext, chain: Chain, local: dict[str, qemu_img.Layer], plan: RestorePlan,
                 out: dict[str, Path], made: list[Path], publish=None) -> None:
    for i, d in enumerate(plan.disks):
        ctx.report(0.6 + 0.3 * i / len(plan.disks), f"writing {d.target} to {d.path}")
        rebuild(local, layers_for(chain.manifests, d.target), out[d.target], fmt=d.format, publish=publish)
        made.append(out[d.target])


# --- as a new domain ------------------------------------------------------------------
def run_restore_as_domain(ctx: JobContext, req: AsDomainRequest) -> dict:
    hv = ctx.require_hypervisor()
    roots = ctx.restore_roots if req.confined and req.disk_dir else None
    if roots is not None and req.disk_dir:
        confine(req.disk_dir, roots, "disk_dir")  # before anything is read
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    backend = ctx.storage(point.storage)
    chain = load_chain(ctx.catalog, backend, point, ctx.repository)
    new_uuid = req.uuid or str(uuid_module.uuid4())
    dest = Destination(AS_DOMAIN, as_domain=req.as_domain, disk_dir=req.disk_dir, start=req.start)
    plan = plan_restore(chain.points, chain.manifests, dest, host=hv.name, selected="by id", new_uuid=new_uuid)
    check_paths(plan)
    if domains.exists(hv, req.as_domain):
        raise RestoreRefused(f"host {hv.name} already has a domain named {req.as_domain!r}; choose another name "
                             "(nothing was changed)")
    check_space(plan)
    # The definition first: a saved XML that cannot be used is refused before anything is written.
    spec = CopySpec(name=req.as_domain, disks={d.target: d.path for d in plan.disks}, uuid=new_uuid,
                    serial_log=plan.serial_log, host_files=public_boot_files(chain.saved_xml))
    copy = copy_domain(chain.saved_xml, spec)
    if copy.dropped:
        log.warning("restore of %s as %s: left out of the saved domain XML: %s", req.domain, req.as_domain,
                    "; ".join(copy.dropped))
    dirs: dict[str, NewDir] = {}
    defined = False
    _start_scratch(ctx)
    try:
        with fetched(ctx, backend, chain, share=0.6) as local:
            for d in plan.disks:
                where = str(Path(d.path).parent)
                if where not in dirs:
                    dirs[where] = NewDir(where, job_id=ctx.job_id, roots=roots, mode=IMAGE_DIR, empty=False,
                                         what="disk_dir" if req.disk_dir else "the image directory")
                    dirs[where].open()
            for i, d in enumerate(plan.disks):
                ctx.report(0.6 + 0.3 * i / len(plan.disks), f"writing {d.target} to {d.path}")
                rebuild_new(local, layers_for(chain.manifests, d.target), dirs[str(Path(d.path).parent)],
                            Path(d.path).name, fmt=d.format)
        for out in dirs.values():
            out.publish()
        ctx.report(0.92, f"defining {req.as_domain}")
        domains.define(hv, copy.xml, req.as_domain)
        defined = True
        if req.start:
            ctx.report(0.95, f"starting {req.as_domain}")
            domains.start(hv, req.as_domain)
    except BaseException:
        _remove_new(hv, req.as_domain if defined else None, list(dirs.values()), plan.serial_log)
        raise
    finally:
        for out in dirs.values():
            out.close()
        ctx.clear_scratch()
    ctx.report(1.0, "done")
    return {"point_id": point.id, "level": point.level, "chain": [p.id for p in chain.points],
            "domain": req.as_domain, "uuid": new_uuid, "source_domain": req.domain, "host": hv.name,
            "disks": {d.target: d.path for d in plan.disks}, "serial_log": plan.serial_log,
            "started": req.start, "left_out_of_xml": list(copy.dropped)}


def _remove_new(hv: Hypervisor, name: str | None, dirs: list[NewDir], serial_log: str | None) -> None:
    """Leave nothing of a failed restore as a new domain (each step reported, never raised):
    the domain, the images this restore created and the directories it created."""
    steps = [lambda: domains.remove(hv, name) if name else None]
    if serial_log:  # refused up front when it existed, so a file there now is the new domain's
        steps.append(lambda: Path(serial_log).unlink(missing_ok=True))
    steps += [out.discard for out in dirs]
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - keep cleaning, the original error is what matters
            log.warning("cleanup after a failed restore as %s: %s", name or "a new domain", e)


# --- in place -------------------------------------------------------------------------
JOURNAL_SUFFIX = ".restore-swap.json"
# Fault points (virtwarden/faults.py; no-ops outside the tests).
REBUILT = "in-place-rebuilt"  # every restored image written, the domain untouched
STOPPED = "in-place-stopped"  # the domain shut off, no disk replaced
AFTER_SWAP = "in-place-after-swap"  # the swap recorded done, nothing after it has run


def journal_of(ctx: JobContext) -> disk_swap.SwapJournal:
    """The job's swap journal: one per job, shared by its attempts, in the host's scratch
    space (a job restoring in place always runs on the domain's host)."""
    return disk_swap.SwapJournal(ctx.scratch_root / f"job-{ctx.job_id}{JOURNAL_SUFFIX}")


def run_restore_in_place(ctx: JobContext, req: InPlaceRequest) -> dict:
    hv = ctx.require_hypervisor()
    journal = journal_of(ctx)
    _settle_other_journals(ctx, req.domain)
    ctx.clear_stale_scratch()
    if journal.state == disk_swap.SWAPPED:
        log.warning("domain %s job %s: an earlier attempt replaced the disks already; finishing the restore "
                    "without restoring again", req.domain, ctx.job_id)
        return _finish(ctx, hv, req, journal, resumed=True)
    if journal.state is not None:
        _put_back_earlier_attempt(ctx, hv, req.domain, journal)
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    backend = ctx.storage(point.storage)
    chain = load_chain(ctx.catalog, backend, point, ctx.repository)
    live = inspect_host(ctx.catalog, hv, req.domain)
    plan = _plan_in_place(hv, req, chain, live)
    swap = disk_swap.DiskSwap(plan, ctx.job_id, ctx.token)
    swap.check()
    _rebuild_temps(ctx, backend, chain, plan, swap)
    faults.pause_point(REBUILT)
    _swap_in(ctx, hv, req, plan, swap, live, journal)
    faults.pause_point(AFTER_SWAP)
    return _finish(ctx, hv, req, journal)


def recover_in_place(ctx: JobContext, req: InPlaceRequest) -> str:
    """The recovery of an in-place restore that gives up (its last attempt was lost):
    leave the domain consistent across all its disks, as a retry would. A half-done swap
    is rolled back (every disk, the old definition, the domain started again if it ran);
    a swap recorded done is finished without restoring again. Returns what it found and
    did, for the job's error message."""
    hv = ctx.require_hypervisor()
    journal = journal_of(ctx)
    ctx.clear_stale_scratch()
    state, was_running = journal.state, bool(journal.body.get("was_running"))
    if state == disk_swap.SWAPPED:
        return _completed_note(_finish(ctx, hv, req, journal, resumed=True))
    if state is not None:
        _put_back_earlier_attempt(ctx, hv, req.domain, journal)
    disk_swap.remove_temps([d.path for d in inspect_host(ctx.catalog, hv, req.domain).disks], ctx.job_id)
    if state is None:
        return f"no disk of {req.domain} had been replaced: its disks and definition are as they were"
    again = "; it was running before and runs again" if was_running else ""
    if state == disk_swap.STOPPING:
        return f"{req.domain} had been shut off for the swap, but no disk had been replaced{again}"
    return f"every disk of {req.domain} and its definition were put back as they were before the restore{again}"


def forget_journal(ctx: JobContext) -> None:
    """Once the job's outcome is recorded no attempt reads its journal again: remove it,
    unless it holds a swap that could not be put back (kept for the operator, and so that
    no later restore of the domain starts over it)."""
    journal = journal_of(ctx)
    if journal.state in (None, disk_swap.SWAPPED):
        journal.forget()


def _completed_note(result: dict) -> str:
    old = ("the replaced images were discarded" if not result["set_aside"]
           else f"the replaced images are kept as {', '.join(result['set_aside'])}")
    note = (f"the restore had completed before: every disk of {result['domain']} holds point {result['point_id']} "
            f"and they are consistent; {old}")
    return note + ("; the domain was started" if result["started"] else "") + \
        "".join(f"; {w}" for w in result.get("warnings", []))


def _plan_in_place(hv: Hypervisor, req: InPlaceRequest, chain: Chain, live: LiveDomain) -> RestorePlan:
    dest = Destination(IN_PLACE, start=req.start, discard_old=req.discard_old)
    plan = plan_restore(chain.points, chain.manifests, dest, host=hv.name, selected="by id", live=live)
    check_paths(plan)
    unknown = [d.target for d in plan.disks if not d.format]
    if unknown:
        raise RestoreRefused(f"the format of the image under {', '.join(unknown)} cannot be read; nothing was changed")
    check_space(plan)
    return plan


def _rebuild_temps(ctx: JobContext, backend: Backend, chain: Chain, plan: RestorePlan,
                   swap: disk_swap.DiskSwap) -> None:
    """Write every restored image under its temporary name while the domain still runs."""
    _start_scratch(ctx)
    try:
        with fetched(ctx, backend, chain, share=0.6) as local:
            _rebuild_all(ctx, chain, local, plan, swap.temps, [])
        for d in plan.disks:
            disk_swap.same_owner(Path(d.path), swap.temps[d.target])
        swap.sync_temps()
    except LeaseLost:
        raise  # the job is another attempt's now: it removes what this one left
    except BaseException:
        swap.cleanup_temps()
        raise
    finally:
        ctx.clear_scratch()


def _swap_in(ctx: JobContext, hv: Hypervisor, req: InPlaceRequest, plan: RestorePlan, swap: disk_swap.DiskSwap,
             live: LiveDomain, journal: disk_swap.SwapJournal) -> None:
    """Shut the domain off, rename the restored images in and define it on them, each
    state journaled first; on failure put everything back as it was."""
    name = req.domain
    try:
        ctx.ensure_owner(f"shut {name} off to replace its disks")
        journal.record(disk_swap.STOPPING, domain=name, job_id=ctx.job_id, was_running=domains.is_running(hv, name))
        ctx.report(0.9, f"shutting {name} off")
        stopped = domains.shutdown(hv, name, timeout=req.shutdown_timeout)
        faults.pause_point(STOPPED)
        _check_unchanged(ctx.catalog, hv, live)
        # With its graphics passwords, so that the definition on the restored images keeps
        # them; the journal on disk gets it without (put back, they come from libvirt again).
        old_xml = hv.inactive_xml(name, secure=True)
        ctx.report(0.95, "replacing the disk images")
        ctx.ensure_owner(f"rename the restored images of {name} into place")
        journal.record(disk_swap.SWAPPING, was_running=stopped != "was-off", stopped=stopped,
                       old_xml=redact(old_xml),
                       checkpoints=[[cp.name, cp.ours] for cp in hv.checkpoints(name)],
                       **swap.journal_fields(), **_outcome(hv, plan, live))
        swap.apply()
        if plan.define and plan.define.update_definition:
            ctx.ensure_owner(f"define {name} on its restored images")
            domains.update_definition(hv, name, repoint_disks(
                old_xml, {d.target: (d.path, d.format) for d in plan.disks}))
        journal.record(disk_swap.SWAPPED)
    except LeaseLost:
        raise  # what this attempt began is its successor's to undo or finish
    except BaseException as e:
        problems = _put_back(ctx, hv, name, journal)
        if problems:  # the journal stays, and its undo rule needs every temporary image kept
            raise HypervisorError(f"{e}; and putting the domain back as it was failed: {'; '.join(problems)} "
                                  f"(journal: {journal.path})") from e
        swap.cleanup_temps()
        raise
    log.info("domain %s job %s: disks replaced by point %s", name, ctx.job_id, plan.point.id)


def _outcome(hv: Hypervisor, plan: RestorePlan, live: LiveDomain) -> dict:
    """What the journal keeps so that any attempt can finish the restore and report it."""
    return {"point_id": plan.point.id, "level": plan.point.level, "chain": [c.id for c in plan.chain],
            "uuid": live.uuid, "host": hv.name, "disks": {d.target: d.path for d in plan.disks},
            "replaced": sorted({p for d in plan.disks for p in d.replaces})}


def _check_unchanged(cat: Catalog, hv: Hypervisor, before: LiveDomain) -> None:
    """The shut-off definition must name the images the plan replaces, and nobody may
    have started the domain again."""
    now = inspect_host(cat, hv, before.name)
    if now.state not in ("shutoff", "crashed"):
        raise RestoreRefused(f"domain {before.name!r} was started again while the restore ran; nothing was changed")
    if {d.target: d.replaces for d in now.disks} != {d.target: d.replaces for d in before.disks}:
        raise RestoreRefused(f"the disks of {before.name!r} in its saved definition differ from the running ones "
                             "(changed while it ran?); nothing was changed: check the definition and restore again")


def _put_back(ctx: JobContext, hv: Hypervisor, name: str, journal: disk_swap.SwapJournal) -> list[str]:
    """Undo what the journal says was begun: every disk back, the old definition back,
    the domain started again if it ran. Returns what could not be done; the journal is
    removed only when everything was."""
    body, problems = journal.body, []
    if journal.state == disk_swap.SWAPPING:
        if domains.is_running(hv, name):
            return [f"domain {name!r} was started on half-replaced disks; shut it off and put them back by hand "
                    f"({disk_swap.how_to_put_back(body)}), then define it from the journal's old_xml (which holds no "
                    "graphics password: set it again)"]
        ctx.ensure_owner(f"put the original disk images of {name} back")
        problems = disk_swap.roll_back(body)
        if not problems:
            problems = _define_again(ctx, hv, name, body["old_xml"])
    if not problems and body.get("was_running") and not domains.is_running(hv, name):
        ctx.ensure_owner(f"start {name} again on its original disks")
        try:
            domains.start(hv, name)
        except VirtwardenError as e:
            problems.append(f"starting it again on its original disks: {e}")
    if not problems:
        journal.forget()
    return problems


def _define_again(ctx: JobContext, hv: Hypervisor, name: str, old_xml: str) -> list[str]:
    """Define the journal's old definition again, with the graphics passwords of the
    definition libvirt holds now (the old one, or the same on restored images)."""
    ctx.ensure_owner(f"put the original definition of {name} back")
    try:
        domains.update_definition(hv, name, carry_passwords(old_xml, hv.inactive_xml(name, secure=True)))
    except VirtwardenError as e:
        return [f"restoring the definition: {e}"]
    return []


LEFT = {disk_swap.STOPPING: "shut off for the swap", disk_swap.SWAPPING: "with its disks half replaced"}


def _put_back_earlier_attempt(ctx: JobContext, hv: Hypervisor, name: str, journal: disk_swap.SwapJournal) -> None:
    left = LEFT.get(journal.state or "", journal.state)
    log.warning("domain %s job %s: an interrupted attempt of this restore left it %s; putting it back as it was",
                name, ctx.job_id, left)
    problems = _put_back(ctx, hv, name, journal)
    if problems:
        raise HypervisorError(f"an interrupted attempt of this restore left {name!r} {left}, and putting it back "
                              f"failed: {'; '.join(problems)} (journal: {journal.path})")


def _settle_other_journals(ctx: JobContext, name: str) -> None:
    """Remove the journals of ended jobs whose restore stands; refuse while another
    job's unfinished swap of this domain is not settled."""
    own = journal_of(ctx).path
    for path in sorted(ctx.scratch_root.glob(f"job-*{JOURNAL_SUFFIX}")):
        if path == own:
            continue
        job_id = path.name[len("job-"):-len(JOURNAL_SUFFIX)]
        other = disk_swap.SwapJournal(path)
        ended = _ended(ctx.catalog, job_id)
        if ended and other.state in (None, disk_swap.SWAPPED):
            other.forget()  # its outcome is recorded: no attempt will read it again
        elif other.body.get("domain") == name and other.state != disk_swap.SWAPPED:
            _refuse_unsettled(name, job_id, path, other, ended)


def _ended(cat: Catalog, job_id: str) -> bool:
    try:
        return jobs.get(cat, job_id).finished
    except JobNotFound:
        return True


def _refuse_unsettled(name: str, job_id: str, path: Path, other: disk_swap.SwapJournal, ended: bool) -> None:
    left = LEFT.get(other.state or "", other.state)
    if not ended:
        raise LockHeld(f"job {job_id}, an in-place restore of {name!r}, was interrupted and left it {left}; its "
                       "next attempt puts it back first, so this restore tries again later (nothing was changed)")
    raise RestoreRefused(f"job {job_id}, an in-place restore of {name!r}, ended with the domain left {left} "
                         f"(journal {path}); put its disks back by hand ({disk_swap.how_to_put_back(other.body)}) "
                         "and remove the journal, then restore again (nothing was changed)")


def _finish(ctx: JobContext, hv: Hypervisor, req: InPlaceRequest, journal: disk_swap.SwapJournal,
            *, resumed: bool = False) -> dict:
    """The restore stands (the journal says swapped): start the domain if asked, forget
    what described the old images, discard them if asked. Every step may run again
    (a later attempt finishing after this one was lost) and does nothing twice."""
    body, name = journal.body, req.domain
    _check_restored(ctx.catalog, hv, name, body)
    warnings: list[str] = []
    _start_restored(ctx, hv, req, body)
    removed = _forget_checkpoints(ctx, hv, name, body.get("checkpoints", []), warnings)
    replaced = set(body["replaced"])
    rows = [r.id for r in overlay_journal.open_for_domain(ctx.catalog, name) if r.overlay_path in replaced]
    overlay_journal.set_state(ctx.catalog, rows, overlay_journal.ABANDONED)
    discarded: list[str] = []
    if req.discard_old:
        ctx.ensure_owner(f"discard the replaced images of {name}")
        discarded = disk_swap.discard(body["aside"], warnings)
    ctx.report(1.0, "done")
    result = {"point_id": body["point_id"], "level": body["level"], "chain": body["chain"], "domain": name,
              "uuid": body["uuid"], "host": body["host"], "disks": body["disks"], "stopped": body["stopped"],
              "started": req.start, "set_aside": [] if req.discard_old else body["aside"], "discarded": discarded,
              "checkpoints_removed": removed}
    result.update({"resumed": True} if resumed else {})
    return {**result, "warnings": warnings} if warnings else result


def _check_restored(cat: Catalog, hv: Hypervisor, name: str, body: dict) -> None:
    """Finishing needs the domain on the images the swap put in place."""
    now = {d.target: d.path for d in inspect_host(cat, hv, name).disks}
    differ = sorted(t for t, path in body["disks"].items() if now.get(t) != path)
    if differ:
        raise RestoreRefused(f"the disks of {name!r} were replaced by this restore, but its definition no longer "
                             f"names the restored images for {', '.join(differ)} (changed since?); nothing more "
                             "was done: check the domain")


def _start_restored(ctx: JobContext, hv: Hypervisor, req: InPlaceRequest, body: dict) -> None:
    """Discard managed-save state that belonged to the old disks, and start the domain
    when asked, unless it runs already (started by an earlier attempt or by hand)."""
    name = req.domain
    if domains.is_running(hv, name):
        return
    ctx.ensure_owner(f"discard the managed save state of {name}")
    if domains.discard_managed_save(hv, name):
        log.warning("domain %s job %s: its managed save state belonged to the replaced disks; discarded",
                    name, ctx.job_id)
    if not req.start:
        return
    ctx.ensure_owner(f"start {name} on its restored disks")
    ctx.report(0.97, f"starting {name}")
    try:
        domains.start(hv, name)
    except Transient:
        raise  # a retry finds the swap done and starts it
    except VirtwardenError as e:
        raise HypervisorError(f"the disks of {name!r} hold point {body['point_id']} now (the restore stands), but "
                              f"starting it failed: {e}") from e


def _forget_checkpoints(ctx: JobContext, hv: Hypervisor, name: str, recorded: list, warnings: list[str]) -> list[str]:
    """Delete the metadata of our checkpoints that existed at the swap (their bitmaps were
    in the images set aside); returns those gone now. Checkpoints made since are kept."""
    present = {cp.name for cp in hv.checkpoints(name)}
    removed = []
    for cp_name, ours in recorded:
        if not ours:
            if cp_name in present:
                warnings.append(f"checkpoint {cp_name} was not made by virtwarden and was left; it no longer "
                                "matches the disks")
            continue
        if cp_name in present:
            ctx.ensure_owner(f"delete checkpoint {cp_name} of {name}")
            try:
                hv.delete_checkpoint(name, cp_name, metadata_only=True)
            except VirtwardenError as e:
                warnings.append(f"could not delete checkpoint {cp_name}: {e}")
                continue
        removed.append(cp_name)
    return removed
