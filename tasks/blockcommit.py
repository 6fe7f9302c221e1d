"""The ``blockcommit`` backup job: external disk-only snapshots and block commit, for
hosts where libvirt's backup API is missing (or not wanted).

The scheme: one change tracker per disk, kept alive between runs
-----------------------------------------------------------------
Between two runs every backed-up disk's live chain is ``base <- T``: ``T`` is the
qcow2 overlay our last run created, so it holds exactly the clusters the guest wrote
since that restore point. ``T`` is named ``<base stem>.<token>.qcow2`` next to the base
image, where ``token`` (``virtwarden-<time>-<point id>``) is stored as the point's
``checkpoint``, and it is journaled in ``catalog.overlays`` (state ``tracking``).

A run (``run_blockcommit_backup``):

1. Recovery (``tasks.overlays.reconcile``): the overlay journal is compared with the
   live chains and whatever an interrupted run left is finished or merged back.
2. Level: ``tasks.backup_steps.plan_level`` (full when asked, no earlier point, after
   ``full_every`` incrementals, disks added, removed or resized, a damaged point in the
   chain); an incremental also
   needs every disk's active image to be the tracker of the chain head. If not (a
   snapshot, commit or redefinition outside virtwarden), a full, saying why.
3. Snapshot: a new overlay ``T'`` per disk is journaled (``created``) and then created,
   for all disks in one atomic external disk-only snapshot without metadata. The old
   active image (``T``, or the base the first time) is now frozen.
4. Ship the frozen layer:
   - incremental: ``T`` itself, copied as a file, its backing reference removed: only
     the clusters written since the previous point (manifest mode ``incremental``,
     restored over the layers below, like a bitmap incremental);
   - full: the whole frozen chain flattened into a standalone image (``qemu-img
     convert -U`` of the chain as libvirt reports it; mode ``full``). This also covers
     a disk that already was a chain of someone else's snapshots.
5. Publish: images stored, manifest last, point complete, ``T'`` becomes the tracker.
6. Merge: ``T`` (only ever overlays of ours, never anyone else's layers) is committed
   into the layer below with a non-active block commit and its file deleted. The chain
   is ``base <- T'`` again.

So a disk that was a plain image is at most two deep after every run (three only
during one). A disk that already had someone else's backing chain keeps it, with one
overlay of ours on top; a snapshot someone stacks on our tracker makes the next run a
full and leaves our old tracker in their chain (released from the journal).

Failures. Before the snapshot nothing on the domain changed. After it, the point
fails (its stored pieces are removed, like a bitmap backup's) and ``T'`` is merged
back into ``T`` with an active commit and a pivot (bounded in time; aborted and
reported when the guest writes faster than the merge), so the chain is as before and
the next run continues the same chain: the writes made meanwhile are in ``T``, where
they belong. A failed merge in step 6 leaves a valid point and a three-deep chain,
which the next run's recovery (or merge) finishes. The journal row is always written
before libvirt creates the file, so a worker killed at any moment leaves nothing that
recovery cannot find. Only one change tracker exists per domain: backing one domain up
with this strategy to two targets in turn makes every run a full.

Consistency: the guest's filesystems are frozen through qemu-guest-agent around the
snapshot only, the one moment that needs it (``tasks.quiesce``, as the request's
``quiesce`` mode says); the point records ``quiesced``, or ``crash`` when they could not
be. A shut-off domain never gets here: ``tasks.backup.run_backup`` copies its disks whole
with qemu-img, as for the bitmap strategy.
"""
from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from virtwarden.catalog import overlays as journal
from virtwarden.catalog import points
from virtwarden.catalog.overlays import OverlayView
from virtwarden.catalog.points import PointView
from virtwarden.hypervisor import qemu_img
from virtwarden.hypervisor.types import NAME_PREFIX, DomainInfo
from virtwarden.tasks import quiesce, recovery
from virtwarden.tasks.backup_steps import (
    BackupRequest,
    LevelPlan,
    Output,
    PointSink,
    build_manifest,
    check_space,
    complete_point,
    plan_level,
    restored_since,
    undo_point,
)
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.overlays import (
    COMMIT_TIMEOUT,
    STRATEGY,
    block_jobs,
    merge_progress,
    overlay_token,
    reconcile,
    remove_overlay_file,
)

from virtwarden import faults, permissions
from virtwarden.errors import HypervisorError, LeaseLost, ToolFailed, VirtwardenError

if TYPE_CHECKING:
    from virtwarden.hypervisor.blockjobs import BlockJobs, Layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Disk:
    """One disk's part in a run."""

    target: str
    frozen: tuple[Layer, ...]  # the chain under the new overlay, top first: what this point ships
    overlay: str  # the new overlay: the next change tracker
    row: int  # its journal id


def run_blockcommit_backup(ctx: JobContext, req: BackupRequest) -> dict:
    hv = ctx.require_hypervisor()
    bj = block_jobs(ctx)
    recovery.recover_backup(ctx, req.domain)
    dom = hv.domain(req.domain)
    _check_domain(dom)
    reconcile(ctx, bj, dom.name, dom.uuid)
    dom = hv.domain(req.domain)  # recovery may have changed the active images
    ctx.storage(req.storage).check()  # an unreachable target fails before anything changes
    quiesce.check(hv, dom.name, req.quiesce, ctx.agent)  # quiesce: always without an agent changes nothing
    head = points.chain_head(ctx.catalog, dom.uuid, req.storage, STRATEGY)
    rows = journal.for_run(ctx.catalog, dom.name, head.checkpoint) if head and head.checkpoint else []
    damaged = points.damaged_since(ctx.catalog, dom.uuid, req.storage, STRATEGY, head)
    plan = plan_blockcommit(req, dom, head, bj.chains(dom.name), rows, restored_since(ctx, dom, head), damaged)
    return _make_point(ctx, bj, req, dom, plan)


def _check_domain(dom: DomainInfo) -> None:
    if not dom.active:
        raise HypervisorError(f"domain {dom.name!r} is {dom.state}: it stopped as its backup began; the next "
                              "run copies its disks whole")
    if not dom.disks:
        raise HypervisorError(f"domain {dom.name!r} has no file or block disks to back up")
    block = [d.target for d in dom.disks if d.source_type != "file"]
    if block:
        raise HypervisorError(f"domain {dom.name!r}: disk {', '.join(block)} is a block device; the blockcommit "
                              "strategy creates an overlay file next to each disk image, so it needs file disks "
                              "(use the bitmap strategy for this domain)")


def plan_blockcommit(req: BackupRequest, dom: DomainInfo, head: PointView | None,
                     chains: dict[str, tuple[Layer, ...]], rows: list[OverlayView],
                     restored: str | None = None, damaged: PointView | None = None) -> LevelPlan:
    """``plan_level``, plus: an incremental needs each disk's live tracker. Pure."""
    plan = plan_level(req, dom, head, {head.checkpoint} if head and head.checkpoint else set(), restored, damaged)
    if plan.level != "incremental" or head is None:
        return plan
    broken = chain_break(head.checkpoint or "", dom, chains, rows)
    return LevelPlan("full", broken) if broken else plan


def chain_break(token: str, dom: DomainInfo, chains: dict[str, tuple[Layer, ...]],
                rows: list[OverlayView]) -> str | None:
    """Why the disks' live chains cannot give an incremental after the point ``token``,
    or None when every disk's active image is that point's change tracker. ``rows``:
    the journal rows of the overlays that run created."""
    mine = {r.target: r for r in rows if overlay_token(r.overlay_path) == token}
    for d in dom.disks:
        row = mine.get(d.target)
        active = chains.get(d.target, ())
        if row is None:
            return f"{d.target} has no overlay from the last backup ({token}); starting a new chain"
        if not active or active[0].path != row.overlay_path:
            return (f"the active image of {d.target} is {active[0].path if active else 'unknown'}, not the "
                    f"overlay {row.overlay_path} of the last backup (a snapshot, commit or redefinition outside "
                    "virtwarden?); starting a new chain")
        if row.state != journal.TRACKING:
            return f"the overlay {row.overlay_path} of {d.target} is {row.state}, not tracking; starting a new chain"
    return None


def _make_point(ctx: JobContext, bj: BlockJobs, req: BackupRequest, dom: DomainInfo, plan: LevelPlan) -> dict:
    hv = ctx.require_hypervisor()
    point_id = str(uuid.uuid4())
    sink = PointSink(ctx, req.storage, dom, point_id, plan)
    plan = sink.plan  # format 2 reads everything when it has no previous index to build on
    token = f"{NAME_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{point_id[:8]}"
    point = points.begin(
        ctx.catalog, id=point_id, domain=dom.name, domain_uuid=dom.uuid, host=hv.name,
        storage=req.storage, strategy=STRATEGY, **sink.lineage, level=plan.level, reason=plan.reason,
        checkpoint=token, manifest_key=sink.manifest_key, job_id=ctx.job_id)
    log.info("domain %s job %s: blockcommit %s backup to %s (%s)", dom.name, ctx.job_id, plan.level,
             req.storage, plan.reason)
    disks: list[_Disk] = []
    try:
        sink.begin(f"backup of {dom.name}, job {ctx.job_id}", lambda why: ctx.report(0.0, f"waiting: {why}"))
        ctx.clear_scratch()
        permissions.make_dirs(ctx.scratch)
        outputs = sink.outputs(ctx, dom)
        check_space(dom, plan, outputs)
        ctx.report(0.0, f"{plan.level} backup: snapshot of {len(outputs)} disk(s)")
        with _consistency(ctx, dom, req.quiesce) as consistency:
            disks = _snapshot(ctx, bj, dom, token)
        _ship(ctx, plan, disks, outputs)
        # An incremental ships each disk's overlay: only what changed, raw disks too.
        artifacts = sink.store(ctx, dom, outputs, set(outputs) if plan.level == "incremental" else set())
        manifest = build_manifest(ctx, dom, point, plan, token, artifacts, "")
        _describe(manifest, plan, disks, consistency)
        digest = sink.publish(manifest, artifacts)
        faults.pause_point("after-manifest")
        done = complete_point(ctx, point_id, artifacts, consistency=consistency, manifest_sha256=digest)
    except BaseException as e:
        undo_point(ctx, sink.repo, dom.name, point_id, sink.prefix, None, e, remove=sink.remove)
        _roll_back(ctx, bj, dom, e)
        raise
    finally:
        ctx.clear_scratch()
        sink.close()
    journal.set_state(ctx.catalog, [d.row for d in disks], journal.TRACKING)
    warnings = _merge_frozen(ctx, bj, dom, disks)
    ctx.report(1.0, "done")
    result = {"point_id": done.id, "level": done.level, "chain_id": done.chain_id,
              "size_bytes": done.size_bytes, "reason": plan.reason, "disks": [a.target for a in artifacts],
              "consistency": consistency, "overlays": {d.target: d.overlay for d in disks}, "format": done.format}
    return {**result, "warnings": warnings} if warnings else result


@contextmanager
def _consistency(ctx: JobContext, dom: DomainInfo, mode: str) -> Iterator[str]:
    """The guest's filesystems frozen around the snapshot and thawed right after it;
    yields ``"quiesced"``, or ``"crash"`` (all disks still snapshotted at one instant)."""
    with quiesce.quiesced(ctx.require_hypervisor(), dom.name, mode, ctx.agent,
                          log=quiesce.job_log(dom.name, ctx.job_id)) as consistency:
        yield consistency


def _snapshot(ctx: JobContext, bj: BlockJobs, dom: DomainInfo, token: str) -> list[_Disk]:
    """Journal, then create, one new overlay per disk, atomically for all disks."""
    chains = bj.chains(dom.name)
    ours = {r.overlay_path for r in journal.open_for_domain(ctx.catalog, dom.name)}
    planned = []
    for disk in dom.disks:
        chain = chains.get(disk.target, ())
        if not chain or chain[0].path != disk.path:
            raise HypervisorError(f"domain {dom.name!r}: the chain of {disk.target} changed while the backup started")
        overlay = overlay_path(chain, ours, token)
        if Path(overlay).exists():
            raise HypervisorError(f"domain {dom.name!r}: {overlay} already exists; not overwriting it")
        planned.append((disk.target, chain, overlay))
    disks: list[_Disk] = []
    for target, chain, overlay in planned:
        row = journal.record(ctx.catalog, job_id=ctx.job_id, domain=dom.name, target=target,
                             overlay_path=overlay, base_path=chain[0].path)
        disks.append(_Disk(target, chain, overlay, row.id))
    ctx.ensure_owner(f"take the snapshot of {dom.name}")
    bj.snapshot(dom.name, token, {d.target: d.overlay for d in disks})
    after = bj.chains(dom.name)
    for d in disks:
        now = tuple(layer.path for layer in after.get(d.target, ()))
        if now[:2] != (d.overlay, d.frozen[0].path):
            raise HypervisorError(f"domain {dom.name!r}: after the snapshot {d.target} is on {now[:2]}, "
                                  f"not {d.overlay} over {d.frozen[0].path}")
    log.info("domain %s job %s: snapshot %s taken: %s", dom.name, ctx.job_id, token,
             ", ".join(f"{d.target} -> {d.overlay}" for d in disks))
    return disks


def overlay_path(chain: tuple[Layer, ...], ours: set[str], token: str) -> str:
    """``<stem>.<token>.qcow2`` next to the disk's own image: the first layer from the
    top that is not one of our overlays (so names never grow run after run)."""
    base = next((layer.path for layer in chain if layer.path not in ours), chain[-1].path)
    where = Path(base)
    stem = where.stem if where.suffix else where.name
    return str(where.with_name(f"{stem}.{token}.qcow2"))


def _ship(ctx: JobContext, plan: LevelPlan, disks: list[_Disk], outputs: dict[str, Output]) -> None:
    """Write each disk's frozen layer where the point sink reads it: the previous tracker as
    it is (incremental), or the frozen chain flattened (full)."""
    for i, d in enumerate(disks):
        dest = outputs[d.target].path
        ctx.report(0.05 + 0.55 * i / len(disks), f"copying {d.target} ({plan.level})")
        if plan.level == "incremental":
            _copy(Path(d.frozen[0].path), dest)
        else:
            qemu_img.export([(Path(layer.path), layer.format) for layer in reversed(d.frozen)], dest)


def _copy(src: Path, dest: Path) -> None:
    """A byte-exact copy of an overlay file, holes kept: its clusters, including ones
    the guest zeroed (qcow2 zero flags), mean the same in the copy. The overlay is
    frozen (QEMU flushed it at the snapshot and no longer writes it)."""
    proc = subprocess.run(["cp", "--sparse=always", str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolFailed(f"copying {src} to {dest} failed: {proc.stderr.strip()}")


def _describe(manifest: dict, plan: LevelPlan, disks: list[_Disk], consistency: str) -> None:
    """What the bitmap manifest does not say: every disk's mode (raw disks too are
    incremental here), the consistency, and the overlays behind the point."""
    for entry in manifest["disks"]:
        entry["mode"] = "incremental" if plan.level == "incremental" else "full"
    manifest["consistency"] = consistency
    manifest["blockcommit"] = {
        "token": manifest["checkpoint"]["name"],
        "frozen": {d.target: [layer.path for layer in d.frozen] for d in disks},
        "overlays": {d.target: d.overlay for d in disks},
    }


def _roll_back(ctx: JobContext, bj: BlockJobs, dom: DomainInfo, error: BaseException) -> None:
    """After a failure: merge this run's overlays back, so the domain is on the chain it
    had before (reported, never raised over the original error). Not by an attempt that
    lost the job: the chain belongs to its successor now, which may be copying the very
    layer a roll-back would merge into."""
    if isinstance(error, LeaseLost):
        return
    try:
        ctx.ensure_owner(f"merge this run's overlays of {dom.name} back")
        reconcile(ctx, bj, dom.name, dom.uuid)
    except LeaseLost:
        log.warning("domain %s job %s: another worker owns the job now; not touching the chains", dom.name,
                    ctx.job_id)
    except Exception as e:  # noqa: BLE001 - the next run's recovery tries again
        log.error("domain %s job %s: could not merge this run's overlays back: %s; the next run will retry",
                  dom.name, ctx.job_id, e)


def _merge_frozen(ctx: JobContext, bj: BlockJobs, dom: DomainInfo, disks: list[_Disk]) -> list[str]:
    """Commit our overlays under each new tracker into the first layer below that is not
    ours. Returns warnings: a failed merge leaves a valid point and a deeper chain,
    which the next run finishes."""
    warnings = []
    rows = {r.overlay_path: r for r in journal.open_for_domain(ctx.catalog, dom.name)}
    new = {d.overlay for d in disks}
    for d in disks:
        run = []
        for layer in d.frozen:
            if layer.path not in rows or layer.path in new:
                break
            run.append(layer.path)
        if not run or len(run) == len(d.frozen):
            continue  # the frozen image is not ours (a plain disk's first run, or someone else's layer)
        base = d.frozen[len(run)].path
        ids = [rows[p].id for p in run]
        journal.set_state(ctx.catalog, ids, journal.MERGING)
        try:
            ctx.ensure_owner(f"merge {run[0]} of {dom.name}")
            bj.commit(dom.name, d.target, top=run[0], base=base, timeout=COMMIT_TIMEOUT,
                      poll=ctx.poll_seconds, progress=merge_progress(ctx, d.target))
        except VirtwardenError as e:
            log.warning("domain %s job %s: %s", dom.name, ctx.job_id, e)
            warnings.append(f"{d.target}: the point is stored, but merging {run[0]} failed: {e}")
            continue
        # The files go before the rows close: a worker that dies in between leaves rows
        # 'merging' whose overlay left the chain, which recovery closes, deleting the file.
        chains = bj.chains(dom.name)
        ctx.ensure_owner(f"delete the merged overlays of {dom.name}")
        for p in run:
            remove_overlay_file(p, chains)
        journal.set_state(ctx.catalog, ids, journal.COMMITTED)
    _release_stale(ctx, bj, dom, new)
    return warnings


def _release_stale(ctx: JobContext, bj: BlockJobs, dom: DomainInfo, new: set[str]) -> None:
    """Old trackers someone stacked their own layers on stay in that chain, no longer ours."""
    stale = [r for r in journal.open_for_domain(ctx.catalog, dom.name)
             if r.state == journal.TRACKING and r.overlay_path not in new]
    if not stale:
        return
    for r in stale:
        log.warning("domain %s job %s: %s stays in the chain of %s under layers virtwarden did not make; "
                    "it is no longer tracked", dom.name, ctx.job_id, r.overlay_path, r.target)
    journal.set_state(ctx.catalog, [r.id for r in stale], journal.ABANDONED)
