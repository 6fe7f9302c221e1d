"""Restores that end in a domain: as a new domain, or in place of the domain's disks.

As a new domain (``run_restore_as_domain``): the point's disks are rebuilt as
``<dir>/<name>-<target>.qcow2`` (see tasks/restore_plan.py for ``<dir>``), and a domain
is defined from the XML saved with the point through ``domxml.copy_xml``: the new name,
a new UUID, new MAC addresses, each disk on its restored image (a blockcommit point's
XML names the change-tracking overlay as the disk's source; it is replaced like any
other source), a file-backed serial console moved to a log of its own, and
(``throwaway.unshare``) its own UEFI variable store, automatic display ports and new
socket paths, so it can run next to the original. Host devices and shared directories
are kept: the copy may be the original's replacement. It is refused
when a file or a domain of that name exists. On any failure nothing is left: images
written are removed and the domain, if defined, is removed again.

In place (``run_restore_in_place``): the restored images are rebuilt first, in the
format each disk has now (qcow2 stays qcow2, raw stays raw, so the definition keeps its
driver types), under temporary names beside the images they replace, while the domain
still runs. Only then is it shut off (a clean shutdown, then power-off after the
timeout) and the images swapped by renames (tasks/disk_swap.py): the current images go
aside as ``<image>.before-restore-<time>``. A disk running on one of our blockcommit
change-tracking overlays is restored into its own image below it, the overlay goes
aside with it, and the definition is updated to the image alone. On any failure the
original images and definition are put back and the domain is started again if it was
running. Once the restore stands, virtwarden's checkpoints of the domain are deleted
(metadata only: their bitmaps were in the images set aside), so the next backup is a
full of a new chain and says why; the set-aside images are kept and listed in the
result, or deleted with ``discard_old``.
"""
from __future__ import annotations

import logging
import os
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path

from catalog import overlays as journal
from catalog.store import Catalog
from hypervisor import domains, qemu_img, snapshots
from hypervisor.blockjobs import live_chains
from hypervisor.domxml import CopySpec, copy_xml, repoint_disks
from hypervisor.libvirt_host import LibvirtHost
from hypervisor.throwaway import unshare
from hypervisor.types import DomainInfo
from tasks import disk_swap
from tasks.context import JobContext
from tasks.restore import Chain, RestoreRefused, fetch, fsync_dir, layers_for, load_chain, rebuild, resolve_point
from tasks.restore_plan import (
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
from virtwarden.errors import HypervisorError, NoSpace, ToolFailed, VirtwardenError

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


@dataclass(frozen=True)
class InPlaceRequest:
    domain: str
    point: str
    discard_old: bool = False
    start: bool = False
    storage: str | None = None
    shutdown_timeout: float = SHUTDOWN_TIMEOUT


def _libvirt(ctx: JobContext) -> LibvirtHost:
    hv = ctx.require_hypervisor()
    if not isinstance(hv, LibvirtHost):
        raise HypervisorError(f"host {hv.name}: restoring a domain needs a libvirt connection")
    return hv


def inspect_live(cat: Catalog, info: DomainInfo, *, managed_save: bool = False,
                 snapshots: tuple[str, ...] = ()) -> LiveDomain:
    """The domain as a restore in place sees it: for each disk, its own image (below the
    blockcommit change-tracking overlays of ours that the journal knows) and that
    image's format."""
    ours = {r.overlay_path: r for r in journal.open_for_domain(cat, info.name)}
    chains = live_chains(info.xml)
    disks = []
    for d in info.disks:
        replaces, fmt = [d.path], d.format
        while replaces[-1] in ours and len(replaces) < 64:
            below, fmt = _below(replaces[-1], chains.get(d.target, ()), ours[replaces[-1]].base_path)
            replaces.append(below)
        disks.append(LiveDisk(d.target, replaces[-1], fmt, d.source_type, tuple(replaces)))
    return LiveDomain(info.name, info.uuid, info.state, info.persistent, tuple(disks), managed_save, snapshots)


def inspect_host(cat: Catalog, hv: LibvirtHost, name: str) -> LiveDomain:
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


def _rebuild_all(ctx: JobContext, chain: Chain, local: dict[str, Path], plan: RestorePlan,
                 out: dict[str, Path], made: list[Path], publish=None) -> None:  # noqa: ANN001
    for i, d in enumerate(plan.disks):
        ctx.report(0.6 + 0.3 * i / len(plan.disks), f"writing {d.target} to {d.path}")
        rebuild(local, layers_for(chain.manifests, d.target), out[d.target], fmt=d.format, publish=publish)
        made.append(out[d.target])


# --- as a new domain ------------------------------------------------------------------
def run_restore_as_domain(ctx: JobContext, req: AsDomainRequest) -> dict:
    hv = _libvirt(ctx)
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    backend = ctx.storage(point.storage)
    chain = load_chain(ctx.catalog, backend, point)
    new_uuid = req.uuid or str(uuid_module.uuid4())
    dest = Destination(AS_DOMAIN, as_domain=req.as_domain, disk_dir=req.disk_dir, start=req.start)
    plan = plan_restore(chain.points, chain.manifests, dest, host=hv.name, selected="by id", new_uuid=new_uuid)
    check_paths(plan)
    if domains.exists(hv, req.as_domain):
        raise RestoreRefused(f"host {hv.name} already has a domain named {req.as_domain!r}; choose another name "
                             "(nothing was changed)")
    check_space(plan)
    made: list[Path] = []
    new_dirs = [p for p in {Path(d.path).parent for d in plan.disks} if not p.exists()]
    defined = False
    _start_scratch(ctx)
    try:
        local = fetch(ctx, backend, chain, share=0.6)
        for where in new_dirs:
            where.mkdir(parents=True, exist_ok=True)
        _rebuild_all(ctx, chain, local, plan, {d.target: Path(d.path) for d in plan.disks}, made,
                     publish=_publish_new)
        spec = CopySpec(name=req.as_domain, disks={d.target: d.path for d in plan.disks}, uuid=new_uuid,
                        serial_log=plan.serial_log)
        ctx.report(0.92, f"defining {req.as_domain}")
        domains.define(hv, unshare(copy_xml(chain.saved_xml, spec)), req.as_domain)
        defined = True
        if req.start:
            ctx.report(0.95, f"starting {req.as_domain}")
            domains.start(hv, req.as_domain)
    except BaseException:
        _remove_new(hv, req.as_domain if defined else None, made, plan.serial_log, new_dirs)
        raise
    finally:
        ctx.clear_scratch()
    ctx.report(1.0, "done")
    return {"point_id": point.id, "level": point.level, "chain": [p.id for p in chain.points],
            "domain": req.as_domain, "uuid": new_uuid, "source_domain": req.domain, "host": hv.name,
            "disks": {d.target: d.path for d in plan.disks}, "serial_log": plan.serial_log,
            "started": req.start}


def _publish_new(partial: Path, out: Path) -> None:
    """Give the finished image its name, never over a file that appeared meanwhile."""
    try:
        os.link(partial, out)
    except FileExistsError:
        raise RestoreRefused(f"{out} appeared while the restore ran; not overwriting it") from None
    fsync_dir(out.parent)


def _remove_new(hv: LibvirtHost, name: str | None, made: list[Path], serial_log: str | None,
                new_dirs: list[Path]) -> None:
    """Leave nothing of a failed restore as a new domain (each step reported, never raised)."""
    steps = [lambda: domains.remove(hv, name) if name else None]
    steps += [lambda p=p: p.unlink(missing_ok=True) for p in made]
    if serial_log:  # refused up front when it existed, so a file there now is the new domain's
        steps.append(lambda: Path(serial_log).unlink(missing_ok=True))
    steps += [lambda d=d: d.rmdir() for d in new_dirs]
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - keep cleaning, the original error is what matters
            log.warning("cleanup after a failed restore as %s: %s", name or "a new domain", e)


# --- in place -------------------------------------------------------------------------
def run_restore_in_place(ctx: JobContext, req: InPlaceRequest) -> dict:
    hv = _libvirt(ctx)
    journal_path = ctx.scratch_root / f"job-{ctx.job_id}.restore-swap.json"
    _recover(hv, req.domain, journal_path)
    point = resolve_point(ctx.catalog, req.domain, req.point, req.storage)
    backend = ctx.storage(point.storage)
    chain = load_chain(ctx.catalog, backend, point)
    live = inspect_host(ctx.catalog, hv, req.domain)
    dest = Destination(IN_PLACE, start=req.start, discard_old=req.discard_old)
    plan = plan_restore(chain.points, chain.manifests, dest, host=hv.name, selected="by id", live=live)
    check_paths(plan)
    unknown = [d.target for d in plan.disks if not d.format]
    if unknown:
        raise RestoreRefused(f"the format of the image under {', '.join(unknown)} cannot be read; nothing was changed")
    check_space(plan)
    swap = disk_swap.DiskSwap(plan, ctx.job_id, journal_path)
    swap.check()
    stopped, redefined, old_xml = None, False, ""
    _start_scratch(ctx)
    try:
        local = fetch(ctx, backend, chain, share=0.6)
        _rebuild_all(ctx, chain, local, plan, swap.temps, [])
        for d in plan.disks:
            disk_swap.same_owner(Path(d.path), swap.temps[d.target])
        ctx.report(0.9, f"shutting {req.domain} off")
        stopped = domains.shutdown(hv, req.domain, timeout=req.shutdown_timeout)
        _check_unchanged(ctx.catalog, hv, live)
        old_xml = hv.inactive_xml(req.domain)
        ctx.report(0.95, "replacing the disk images")
        swap.apply(old_xml, restart=stopped != "was-off")
        if plan.define and plan.define.update_definition:
            domains.update_definition(hv, req.domain, repoint_disks(
                old_xml, {d.target: (d.path, d.format) for d in plan.disks}))
            redefined = True
        swap.done()
        if domains.discard_managed_save(hv, req.domain):
            log.warning("domain %s: its managed save state belonged to the replaced disks; discarded", req.domain)
        if req.start:
            ctx.report(0.97, f"starting {req.domain}")
            domains.start(hv, req.domain)
    except BaseException as e:
        problems = _roll_back(hv, req.domain, swap, old_xml if redefined else None,
                              restart=stopped in ("shutdown", "destroyed"))
        if problems:
            raise HypervisorError(f"{e}; and putting the domain back as it was failed: {'; '.join(problems)}") from e
        raise
    finally:
        ctx.clear_scratch()
    return _after_in_place(ctx, hv, req, plan, swap, live, stopped or "")


def _check_unchanged(cat: Catalog, hv: LibvirtHost, before: LiveDomain) -> None:
    """The shut-off definition must name the images the plan replaces, and nobody may
    have started the domain again."""
    now = inspect_host(cat, hv, before.name)
    if now.state not in ("shutoff", "crashed"):
        raise RestoreRefused(f"domain {before.name!r} was started again while the restore ran; nothing was changed")
    if {d.target: d.replaces for d in now.disks} != {d.target: d.replaces for d in before.disks}:
        raise RestoreRefused(f"the disks of {before.name!r} in its saved definition differ from the running ones "
                             "(changed while it ran?); nothing was changed: check the definition and restore again")


def _roll_back(hv: LibvirtHost, name: str, swap: disk_swap.DiskSwap, old_xml: str | None,
               restart: bool) -> list[str]:
    problems = swap.undo()
    if old_xml:
        try:
            domains.update_definition(hv, name, old_xml)
        except VirtwardenError as e:
            problems.append(f"restoring the definition: {e}")
    if restart and not problems:
        try:
            if not domains.is_running(hv, name):
                domains.start(hv, name)
        except VirtwardenError as e:
            problems.append(f"starting it again on its original disks: {e}")
    return problems


def _recover(hv: LibvirtHost, name: str, journal_path: Path) -> None:
    body = disk_swap.recover(journal_path)
    if body is None:
        return
    log.warning("domain %s: an interrupted attempt of this restore had begun replacing disks; put back", name)
    domains.update_definition(hv, name, body["old_xml"])


def _after_in_place(ctx: JobContext, hv: LibvirtHost, req: InPlaceRequest, plan: RestorePlan,
                    swap: disk_swap.DiskSwap, live: LiveDomain, stopped: str) -> dict:
    """The restore stands: forget what described the old images."""
    warnings: list[str] = []
    removed = []
    for cp in hv.checkpoints(req.domain):
        if not cp.ours:
            warnings.append(f"checkpoint {cp.name} was not made by virtwarden and was left; it no longer "
                            "matches the disks")
            continue
        try:
            hv.delete_checkpoint(req.domain, cp.name, metadata_only=True)
            removed.append(cp.name)
        except VirtwardenError as e:
            warnings.append(f"could not delete checkpoint {cp.name}: {e}")
    replaced = {p for d in plan.disks for p in d.replaces}
    rows = [r.id for r in journal.open_for_domain(ctx.catalog, req.domain) if r.overlay_path in replaced]
    journal.set_state(ctx.catalog, rows, journal.ABANDONED)
    discarded = swap.discard(warnings) if req.discard_old else []
    kept = [] if req.discard_old else swap.set_aside
    point = plan.point
    ctx.report(1.0, "done")
    result = {"point_id": point.id, "level": point.level, "chain": [c.id for c in plan.chain],
              "domain": req.domain, "uuid": live.uuid, "host": hv.name,
              "disks": {d.target: d.path for d in plan.disks}, "stopped": stopped, "started": req.start,
              "set_aside": kept, "discarded": discarded, "checkpoints_removed": removed}
    return {**result, "warnings": warnings} if warnings else result
