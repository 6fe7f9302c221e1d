"""Bringing a domain's live backing chains and the overlay journal into agreement.

The ``blockcommit`` strategy changes disk chains in several steps (journal, snapshot,
copy, commit); a worker can die between any two. Every blockcommit run therefore starts
here (and a failed run ends here), with the domain lock held, so no other job of ours
is changing the domain:

- a block job still running on a disk is finished: an active commit of one of our
  overlays is pivoted once ready (it was a roll-back), a plain commit is waited for;
  any other block job (a copy or pull someone started) stops the run with a message;
- a journaled overlay of a run that never completed its point is merged back into the
  layer below (active commit + pivot when it is the active image), so the disk is on a
  chain we know again and the writes made meanwhile are kept;
- a merge that was cut short is done again;
- an overlay that left the chain is closed in the journal: its file is deleted when it
  never held data of its own there (it never entered the chain, or it was merged), and
  left in place, with a warning, when someone else removed it from the chain.

Only journaled overlays, whose names carry our prefix, are ever merged or deleted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from virtwarden.catalog import overlays as journal
from virtwarden.catalog import points
from virtwarden.catalog.overlays import OverlayView
from virtwarden.hypervisor.types import NAME_PREFIX
from virtwarden.tasks.context import JobContext

from virtwarden.errors import HypervisorError

if TYPE_CHECKING:
    from virtwarden.hypervisor.blockjobs import BlockJobs, Layer, Progress

log = logging.getLogger(__name__)
STRATEGY = "blockcommit"
COMMIT_TIMEOUT = 900.0  # seconds a block commit may run before it is aborted and reported
_MAX_STEPS = 32  # chain changes per reconciliation; more means something keeps undoing ours


def block_jobs(ctx: JobContext) -> BlockJobs:
    """The block operations on the job's host."""
    from virtwarden.hypervisor.blockjobs import BlockJobs

    return BlockJobs(ctx.require_hypervisor())


def overlay_token(path: str) -> str | None:
    """The run token in an overlay's file name ``<base>.<token>.qcow2``."""
    name = Path(path).name
    at = name.rfind("." + NAME_PREFIX)
    if at < 0 or not name.endswith(".qcow2"):
        return None
    return name[at + 1:-len(".qcow2")]


@dataclass(frozen=True)
class Action:
    """One step that brings a journal row and the live chain closer together."""

    kind: str  # close | promote | rollback | merge
    row: OverlayView
    state: str = ""  # close: the final state
    delete_file: bool = False  # close: the file holds nothing anyone needs
    base: str = ""  # merge: the layer below the row
    why: str = ""


def plan_reconcile(rows: list[OverlayView], chains: dict[str, tuple[Layer, ...]],
                   heads: set[str]) -> list[Action]:
    """What to do about each open journal row, given the live chains and the run tokens of
    complete chain heads. Pure. Actions that change a chain come after the journal-only
    ones, and only the first of them is valid (the chain changes when it runs)."""
    quick: list[Action] = []
    slow: list[Action] = []
    for row in rows:
        chain = tuple(layer.path for layer in chains.get(row.target, ()))
        token = overlay_token(row.overlay_path)
        complete = token is not None and token in heads
        if row.overlay_path not in chain:
            quick.append(_close_missing(row, complete))
            continue
        at = chain.index(row.overlay_path)
        if row.state == journal.CREATED and complete:
            quick.append(Action("promote", row, why="its restore point is complete"))
        elif row.state in (journal.CREATED, journal.MERGING) and at == 0:
            slow.append(Action("rollback", row, why="a run that did not finish left it as the active image"
                               if row.state == journal.CREATED else "its merge was cut short"))
        elif row.state == journal.MERGING and at + 1 < len(chain):
            slow.append(Action("merge", row, base=chain[at + 1], why="its merge was cut short"))
        elif row.state == journal.CREATED:
            quick.append(Action("close", row, journal.ABANDONED, why=f"{chain[at - 1]} was stacked on it "
                                "outside virtwarden; it stays in that chain"))
    return quick + slow[:1]


def _close_missing(row: OverlayView, complete: bool) -> Action:
    if row.state == journal.MERGING:
        return Action("close", row, journal.COMMITTED, True, why="its merge finished")
    if row.state == journal.CREATED and not complete:
        return Action("close", row, journal.ABANDONED, True, why="its run did not finish")
    return Action("close", row, journal.ABANDONED, False,
                  why="it left the chain outside virtwarden (a manual blockcommit, pull or redefinition?); "
                      "its file was left in place")


def reconcile(ctx: JobContext, bj: BlockJobs, domain: str, domain_uuid: str) -> None:
    """Finish or undo what earlier runs left on ``domain``'s chains (see module doc)."""
    rows = journal.open_for_domain(ctx.catalog, domain)
    _settle_block_jobs(ctx, bj, domain, {r.overlay_path for r in rows})
    remove_merged_leftovers(ctx, bj, domain)
    if not rows:
        return
    heads = {p.checkpoint for p in points.heads(ctx.catalog, domain_uuid)
             if p.strategy == STRATEGY and p.checkpoint}
    for _ in range(_MAX_STEPS):
        chains = bj.chains(domain)
        actions = plan_reconcile(journal.open_for_domain(ctx.catalog, domain), chains, heads)
        if not actions:
            return
        for action in actions:
            _apply(ctx, bj, domain, action, chains)
    raise HypervisorError(f"domain {domain!r}: its overlays and backing chains did not settle after "
                          f"{_MAX_STEPS} steps; something else is changing its disks")


def _apply(ctx: JobContext, bj: BlockJobs, domain: str, action: Action,
           chains: dict[str, tuple[Layer, ...]]) -> None:
    row = action.row
    ctx.ensure_owner(f"{action.kind} overlay {row.overlay_path} of {domain}")
    log.warning("domain %s job %s: overlay %s of %s (%s): %s: %s", domain, ctx.job_id, row.overlay_path,
                row.target, row.state, action.kind, action.why)
    if action.kind == "promote":
        journal.set_state(ctx.catalog, [row.id], journal.TRACKING)
    elif action.kind == "close":
        if action.delete_file:  # the file first: a closed row is never looked at again
            remove_overlay_file(row.overlay_path, chains)
        journal.set_state(ctx.catalog, [row.id], action.state)
    else:
        journal.set_state(ctx.catalog, [row.id], journal.MERGING)
        progress = merge_progress(ctx, row.target, 0.0)
        if action.kind == "rollback":
            bj.commit_active(domain, row.target, timeout=COMMIT_TIMEOUT, poll=ctx.poll_seconds, progress=progress)
        else:
            bj.commit(domain, row.target, top=row.overlay_path, base=action.base, timeout=COMMIT_TIMEOUT,
                      poll=ctx.poll_seconds, progress=progress)
        ctx.ensure_owner(f"delete merged overlay {row.overlay_path}")
        remove_overlay_file(row.overlay_path, bj.chains(domain))
        journal.set_state(ctx.catalog, [row.id], journal.COMMITTED)


def _settle_block_jobs(ctx: JobContext, bj: BlockJobs, domain: str, ours: set[str]) -> None:
    """Let block jobs left by an earlier run end; refuse to work next to anyone else's."""
    for target, chain in bj.chains(domain).items():
        if not chain:
            continue
        job = bj.job(domain, target)
        if job is None:
            continue
        pivot = job.kind == "active-commit" and chain[0].path in ours
        if job.kind != "commit" and not pivot:
            raise HypervisorError(
                f"domain {domain!r}: disk {target} has a running {job.kind} block job that virtwarden did not "
                f"start; let it finish or cancel it (virsh blockjob {domain} {target} --abort), then back up again")
        ctx.ensure_owner(f"finish the {job.kind} block job left on {target} of {domain}")
        log.warning("domain %s job %s: finishing the %s block job an earlier run left on %s",
                    domain, ctx.job_id, job.kind, target)
        bj.wait(domain, target, pivot=pivot, timeout=COMMIT_TIMEOUT, poll=ctx.poll_seconds,
                progress=merge_progress(ctx, target, 0.0), what=f"{job.kind} on {target}")


def remove_merged_leftovers(ctx: JobContext, bj: BlockJobs, domain: str) -> list[str]:
    """Delete overlay files of ours that were merged (journal row ``committed``) but
    stayed on disk: a release before this one closed the row first and deleted the file
    after, and a worker that died in between left the file for good. Only files the
    journal knows as committed and no chain uses are touched."""
    chains = bj.chains(domain)
    dirs = {str(Path(layer.path).parent) for chain in chains.values() for layer in chain}
    found = [str(p) for d in sorted(dirs) for p in Path(d).glob(f"*.{NAME_PREFIX}*.qcow2")]
    merged = journal.committed_paths(ctx.catalog, domain, found)
    for path in sorted(merged):
        ctx.ensure_owner(f"delete merged overlay {path} left behind")
        log.warning("domain %s job %s: deleting %s: merged long ago, its file was left behind", domain,
                    ctx.job_id, path)
        remove_overlay_file(path, chains)
    return sorted(merged)


def merge_progress(ctx: JobContext, target: str, fraction: float = 0.99) -> Progress:
    """Report a block commit's progress (at ``fraction`` of the whole job)."""
    def report(cur: int, end: int) -> None:
        ctx.report(fraction, f"merging {target}: {cur >> 20} of {end >> 20} MiB")

    return report


def remove_overlay_file(path: str, chains: dict[str, tuple[Layer, ...]]) -> None:
    """Delete an overlay file of ours that no live chain uses."""
    if overlay_token(path) is None or any(path == layer.path for c in chains.values() for layer in c):
        log.warning("not deleting %s: it is not one of our overlays, or a chain still uses it", path)
        return
    Path(path).unlink(missing_ok=True)
