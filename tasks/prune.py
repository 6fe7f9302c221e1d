"""The prune job: apply retention to a domain's restore points, crash-safely.

Which points go is decided by the pure ``policies.retention.select_kept``, per chain
group (one domain UUID, storage target and strategy) over its complete points; the rules
come with the request, resolved where the policies are (virtwarden/submit/prune.py), so the job
makes no policy decisions of its own.

The rule this module keeps: an interrupted prune leaves nothing listed that cannot be
restored. "Listed" is ``complete`` in the catalog: what ``backups`` offers, what
``restore`` accepts and what the next incremental builds on. Each doomed point goes in
three steps:

1. catalog ``complete -> deleting``: from here on it is never offered or built on;
2. storage: the manifest first (the point is no longer published), then its data, then
   unfinished uploads (``Repository.delete_point``);
3. catalog ``deleting -> deleted`` (kept as a record, shown by ``backups``).

Catalog first, because storage first would leave, after a crash between the two, a
complete row whose manifest is gone: listed and unrestorable. The other way round a
crash leaves at worst a ``deleting`` row with some of its data still stored: unlisted
leftovers, which the next prune of the domain finishes. Points go children first
(``deletion_order``): the kept set is closed under dependencies, so when a point is
unlisted nothing listed depends on it. A backup never builds on a doomed point either:
it takes its parent from the newest complete point of its group, which is always kept
(see ``plan_domain``); before step 1 the catalog is asked once more anyway.

Leftovers of failed backups (their cleanup failed, too) are removed once they are a day
old: one listing per failed point.

Damaged points (a verification found their data missing or changed, tasks/verify.py)
are not restorable, so they take no place in retention and pin nothing: the rules are
applied to the complete points alone, exactly as if the damaged ones were gone, so a
damaged point never makes retention keep fewer good points or keep a parent longer.
They are not deleted at once either: their rows and stored data stay, visible in
``backups`` with what was found, for the operator to look into, until retention would
have removed them had they been intact (``damaged_fate``: the same rules over the
complete and damaged points together). A policy without retention keeps them, like
everything else. Nothing restorable depends on a damaged point (whatever was built on
it is damaged too), so one goes whenever its time comes, in any order.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from virtwarden.catalog import drills, jobs, points
from virtwarden.catalog.clock import database_now
from virtwarden.catalog.points import COMPLETE, DAMAGED, DELETED, DELETING, FAILED, WRITING, PointView
from virtwarden.catalog.store import Catalog
from virtwarden.policies.model import Retention
from virtwarden.policies.retention import KeptSet, deletion_order, select_kept
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.recovery import remove_point_data

from virtwarden.errors import JobFailed, Transient, VirtwardenError

log = logging.getLogger(__name__)
FAILED_GRACE = timedelta(days=1)  # a failed point's leftovers are removed after this


@dataclass(frozen=True)
class DomainRules:
    """The retention that governs one domain, and why (for the plan and the logs)."""

    domain: str
    policy: str | None
    retention: Retention | None  # None: keep every point
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "source": self.source,
                "retention": self.retention.model_dump() if self.retention else None}

    @classmethod
    def from_json(cls, domain: str, data: dict[str, Any]) -> DomainRules:
        kept = data.get("retention")
        return cls(domain, data.get("policy"), Retention(**kept) if kept else None, data.get("source", ""))


@dataclass(frozen=True)
class PruneRequest:
    domain: str | None = None  # None: every domain in ``rules``
    policy: str | None = None  # as asked; already applied when ``rules`` were resolved
    dry_run: bool = False
    # domain -> DomainRules.to_json(), filled in by virtwarden/submit/prune.py when the job is made.
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupPlan:
    """The decision for one chain group, with the points it was made over: ``kept``
    over its complete ``points``, ``damaged_kept`` over its ``damaged`` ones."""

    storage: str
    strategy: str
    points: tuple[PointView, ...]
    kept: KeptSet
    damaged: tuple[PointView, ...] = ()
    damaged_kept: frozenset[str] = frozenset()

    @property
    def doomed(self) -> list[PointView]:
        by_id = {p.id: p for p in self.points}
        return [by_id[i] for i in self.kept.doomed] + [p for p in self.damaged if p.id not in self.damaged_kept]

    def rows(self) -> list[dict[str, Any]]:
        rows = [_row(p, "keep" if d.keep else "delete", d.why)
                for p, d in zip(self.points, self.kept.decisions, strict=True)]
        return rows + [_row(p, "keep", "damaged; retention would still keep it, so it stays visible")
                       if p.id in self.damaged_kept else
                       _row(p, "delete", "damaged; retention would have removed it by now") for p in self.damaged]


def damaged_fate(complete: list[PointView], damaged: list[PointView], retention: Retention | None,
                 now: datetime) -> frozenset[str]:
    """The damaged points that stay (as records, with their data, for a look): those the
    rules would keep if every point were intact. Pure."""
    if not damaged:
        return frozenset()
    everything = sorted([*complete, *damaged], key=lambda p: (p.created_at, p.seq))
    kept = select_kept(everything, retention, now).kept
    return frozenset(p.id for p in damaged if p.id in kept)


def plan_domain(cat: Catalog, domain: str, retention: Retention | None, now: datetime,
                only: tuple[str, str] | None = None) -> list[GroupPlan]:
    """The plan for each chain group of ``domain`` (or only those on ``only``'s storage
    and strategy).

    A group is one domain UUID, storage target and strategy: exactly what a backup takes
    its parent from (``points.chain_head``: the newest complete point of the group),
    and the newest point of a group is always kept, so a backup never builds on a
    doomed point. A name reused by a new domain therefore starts a group of its own,
    and the old domain's newest point stays until it is deleted by hand. Parents of
    points still being written are pinned as well, and so are points that queued or
    running restores and drills will read (with what they need of their chain).
    """
    found = points.for_domain(cat, domain)
    pinned = {p.parent_id for p in found if p.status == WRITING and p.parent_id}
    pinned |= drills.points_in_use(cat, domain)  # a drill is restoring them (and, so, their chain)
    pinned |= jobs.points_being_restored(cat, domain)  # restores and drills queued or running
    groups: dict[tuple[str, str, str], list[PointView]] = {}
    for p in found:
        if p.status in (COMPLETE, DAMAGED) and (only is None or (p.storage, p.strategy) == only):
            groups.setdefault((p.storage, p.strategy, p.domain_uuid), []).append(p)
    return [_plan_group(storage, strategy, ps, retention, now, pinned)
            for (storage, strategy, _uuid), ps in sorted(groups.items())]


def _plan_group(storage: str, strategy: str, found: list[PointView], retention: Retention | None, now: datetime,
                pinned: set[str]) -> GroupPlan:
    complete = [p for p in found if p.status == COMPLETE]
    damaged = [p for p in found if p.status == DAMAGED]
    return GroupPlan(storage, strategy, tuple(complete), select_kept(complete, retention, now, pinned),
                     tuple(damaged), damaged_fate(complete, damaged, retention, now))


def run_prune(ctx: JobContext, req: PruneRequest) -> dict[str, Any]:
    now = database_now(ctx.catalog)  # points' times are the database's: compare like with like
    domains = [req.domain] if req.domain else sorted(req.rules)
    if req.domain and req.domain not in req.rules:
        raise JobFailed(f"prune of {req.domain!r}: the request carries no retention for it; submit prune jobs"
                        " with `virtwarden prune` (virtwarden/submit/prune.py), which resolves the policies")
    reports, errors = [], []
    for i, domain in enumerate(domains):
        ctx.report(i / len(domains), f"{domain}: applying retention")
        rules = DomainRules.from_json(domain, req.rules[domain])
        report = dry_run_domain(ctx.catalog, rules, now) if req.dry_run else prune_all(ctx, rules, now)
        errors += [f"{domain}: {e}" for e in report.get("errors", [])]
        reports.append(report)
    ctx.report(1.0, "done")
    result = summarize(reports, req.dry_run)
    if errors:
        raise JobFailed(f"{result['summary']}; but: {'; '.join(errors)}")
    return result


def dry_run_domain(cat: Catalog, rules: DomainRules, now: datetime) -> dict[str, Any]:
    """What pruning the domain would do; changes nothing."""
    return _report(rules, plan_domain(cat, rules.domain, rules.retention, now), _interrupted(cat, rules.domain))


def _report(rules: DomainRules, plans: list[GroupPlan], interrupted: list[PointView]) -> dict[str, Any]:
    rows = [r for g in plans for r in g.rows()]
    rows += [_row(p, "delete", "an interrupted prune left it half deleted") for p in interrupted]
    return {"domain": rules.domain, **rules.to_json(), "points": rows,
            "deleted": [r["id"] for r in rows if r["action"] == "delete"]}


def prune_all(ctx: JobContext, rules: DomainRules, now: datetime) -> dict[str, Any]:
    """Finish interrupted deletions, apply the plan of every group, sweep failed leftovers."""
    plans = plan_domain(ctx.catalog, rules.domain, rules.retention, now)
    report = _report(rules, plans, _interrupted(ctx.catalog, rules.domain))
    deleted = _finish_interrupted(ctx, rules.domain)
    errors = []
    for plan in plans:
        try:
            deleted += apply(ctx, plan)
        except Transient:
            raise  # the whole job is tried again; every step here is idempotent
        except VirtwardenError as e:
            log.error("domain %s job %s: pruning %s/%s failed: %s", rules.domain, ctx.job_id, plan.storage,
                      plan.strategy, e)
            errors.append(f"storage {plan.storage}: {e}")
    report.update(deleted=deleted, swept=sweep_failed(ctx, rules.domain, now), errors=errors)
    return report


def prune_domain(ctx: JobContext, domain: str, storage: str, strategy: str, retention: Retention | None,
                 *, now: datetime | None = None) -> dict[str, Any]:
    """Apply ``retention`` to one chain group: what a backup job calls after a success.

    Returns the group's kept and deleted point ids. Never raises for a point another
    prune is already deleting; storage errors propagate.
    """
    now = now or database_now(ctx.catalog)
    deleted = _finish_interrupted(ctx, domain, only=(storage, strategy))
    kept: list[str] = []
    for plan in plan_domain(ctx.catalog, domain, retention, now, only=(storage, strategy)):
        deleted += apply(ctx, plan)
        kept += sorted(plan.kept.kept)
    return {"domain": domain, "storage": storage, "strategy": strategy, "kept": kept, "deleted": deleted}


def apply(ctx: JobContext, plan: GroupPlan) -> list[str]:
    """Delete the plan's doomed points, children first; the ids actually deleted."""
    done = []
    for i, p in enumerate(plan.doomed):
        ctx.report(i / max(len(plan.doomed), 1), f"{p.domain}: deleting point {p.id} ({i + 1} of {len(plan.doomed)})")
        if delete_point(ctx, p):
            done.append(p.id)
    return done


def delete_point(ctx: JobContext, p: PointView, *, resume: bool = False) -> bool:
    """Unlist, unpublish, remove, record (see the module docstring). False when the
    point is not ours to delete: no longer as planned (another prune has it), or some
    point builds on it (never the case for a plan's doomed points; checked anyway).
    ``resume``: finish a point an interrupted prune left ``deleting``."""
    cat = ctx.catalog
    users = [q.id for q in points.for_domain(cat, p.domain, statuses=(COMPLETE, WRITING)) if q.parent_id == p.id]
    if users:
        log.error("domain %s job %s: not deleting point %s: %s builds on it", p.domain, ctx.job_id, p.id,
                  ", ".join(users))
        return False
    # A complete point goes only while still complete, a damaged one while damaged: a
    # point whose status changed since the plan was made is judged again next time.
    frm = (DELETING,) if resume else (p.status,) if p.status in (COMPLETE, DAMAGED) else ()
    if not frm or not points.transition(cat, p.id, frm, DELETING):
        return False
    remove_point_data(Repository(ctx.storage(p.storage)), _prefix(p))
    points.transition(cat, p.id, (DELETING,), DELETED)
    log.info("domain %s job %s: deleted %s point %s of %s from %s", p.domain, ctx.job_id, p.level, p.id,
             p.created_at.isoformat(), p.storage)
    return True


def _interrupted(cat: Catalog, domain: str, only: tuple[str, str] | None = None) -> list[PointView]:
    found = [p for p in points.for_domain(cat, domain, statuses=(DELETING,))
             if only is None or (p.storage, p.strategy) == only]
    order = deletion_order(found, [p.id for p in found])
    by_id = {p.id: p for p in found}
    return [by_id[i] for i in order]


def _finish_interrupted(ctx: JobContext, domain: str, only: tuple[str, str] | None = None) -> list[str]:
    """Points an earlier prune left ``deleting`` (it died between the steps): nothing
    listed depends on them, so their removal is simply completed."""
    done = []
    for p in _interrupted(ctx.catalog, domain, only):
        log.warning("domain %s job %s: finishing the interrupted deletion of point %s", domain, ctx.job_id, p.id)
        if delete_point(ctx, p, resume=True):
            done.append(p.id)
    return done


def sweep_failed(ctx: JobContext, domain: str, now: datetime) -> int:
    """Remove what failed backups left in storage when their own cleanup failed too;
    returns how many points had leftovers."""
    swept = 0
    for p in points.for_domain(ctx.catalog, domain, statuses=(FAILED,)):
        if p.created_at > now - FAILED_GRACE:
            continue
        repo = Repository(ctx.storage(p.storage))
        if any(True for _ in repo.backend.list(_prefix(p))):
            log.info("domain %s job %s: removing leftovers of failed point %s", domain, ctx.job_id, p.id)
            remove_point_data(repo, _prefix(p))
            swept += 1
    return swept


def summarize(reports: Iterable[dict[str, Any]], dry_run: bool) -> dict[str, Any]:
    reports = list(reports)
    deleted = [i for r in reports for i in r["deleted"]]
    kept = sum(1 for r in reports for row in r["points"] if row["action"] == "keep")
    verb = "would delete" if dry_run else "deleted"
    text = f"{verb} {len(deleted)} point(s), kept {kept}, in {len(reports)} domain(s)"
    return {"dry_run": dry_run, "domains": reports, "deleted": deleted, "kept": kept, "summary": text}


def _row(p: PointView, action: str, reason: str) -> dict[str, Any]:
    return {"id": p.id, "created_at": p.created_at.isoformat(), "level": p.level, "chain_id": p.chain_id,
            "parent_id": p.parent_id, "storage": p.storage, "strategy": p.strategy, "status": p.status,
            "action": action, "reason": reason}


def _prefix(p: PointView) -> str:
    return p.manifest_key.rsplit("/", 1)[0] + "/"


__all__ = ["DELETED", "DomainRules", "GroupPlan", "PruneRequest", "apply", "damaged_fate", "delete_point",
           "plan_domain", "prune_domain", "run_prune"]
