"""The fleet as the on-call engineer first wants to see it (``GET /v1/overview``, the
dashboard's first page): one row per domain the catalog knows (the listener's and
scheduler's inventory, and every domain with restore points), with the policy that
governs its backups and when that policy's schedule next fires, its newest good
point and that point's age, what its points hold, whether its last backup failed,
and its last drill.

Read from the catalog and the policy files only: no libvirt, no storage. The policy is
chosen by name and host (``policies.select``); a policy that selects by metadata is
judged without it here (the metadata lives in libvirt and in manifests), so such a
domain may show no policy although its backups run under one.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from virtwarden.catalog import points
from virtwarden.catalog.models import Domain, Drill, Job, RestorePoint
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import VirtwardenError
from virtwarden.policies import load_policies
from virtwarden.policies.schedule import next_slot
from virtwarden.policies.select import DomainFacts, governing


def domains(cfg: Config, cat: Catalog, now: datetime) -> list[dict[str, Any]]:
    """One row per domain, by name."""
    try:
        found = load_policies(cfg)
        policy_error = None
    except VirtwardenError as e:  # the page still shows the fleet, and says why no policy is known
        found, policy_error = [], str(e)
    newest_job = (select(Job.domain, func.max(Job.created_at).label("at")).where(Job.kind == "backup")
                  .where(Job.domain.is_not(None)).group_by(Job.domain).subquery())
    newest_drill = select(Drill.domain, func.max(Drill.started_at).label("at")).group_by(Drill.domain).subquery()
    with cat.session() as s:
        seen = {name: (host, state) for name, host, state in
                s.execute(select(Domain.name, Domain.host, Domain.state).order_by(Domain.last_seen_at))}
        good: dict[str, tuple[datetime, int, int]] = {
            d: (at, size, n) for d, at, size, n in s.execute(
                select(RestorePoint.domain, func.max(RestorePoint.created_at), func.sum(RestorePoint.size_bytes),
                       func.count())
                .where(RestorePoint.status == points.COMPLETE).group_by(RestorePoint.domain))}
        newest_good = (select(RestorePoint.domain, func.max(RestorePoint.created_at).label("at"))
                       .where(RestorePoint.status == points.COMPLETE).group_by(RestorePoint.domain).subquery())
        made_on = {d: host for d, host in s.execute(  # the host of each domain's newest good point
            select(RestorePoint.domain, RestorePoint.host).where(RestorePoint.status == points.COMPLETE)
            .join(newest_good, (RestorePoint.domain == newest_good.c.domain)
                  & (RestorePoint.created_at == newest_good.c.at)))}
        last_backup: dict[str, tuple[str, str | None, datetime]] = {
            str(d): (state, error, at) for d, state, error, at in s.execute(
                select(Job.domain, Job.state, Job.error, Job.created_at).where(Job.kind == "backup")
                .join(newest_job, (Job.domain == newest_job.c.domain) & (Job.created_at == newest_job.c.at)))}
        drills = {r.domain: r for r in s.scalars(select(Drill).join(
            newest_drill, (Drill.domain == newest_drill.c.domain) & (Drill.started_at == newest_drill.c.at)))}
    names = sorted({*seen, *good, *last_backup})
    rows = []
    for name in names:
        host = seen.get(name, (None, None))[0] or made_on.get(name)
        row: dict[str, Any] = {"domain": name, "host": host, "state": seen.get(name, (None, None))[1],
                               "policy": None, "policy_error": policy_error, "next_backup_at": None}
        try:
            chosen = governing(found, DomainFacts(name, host))
        except VirtwardenError as e:
            chosen, row["policy_error"] = None, str(e)
        backup = chosen.spec.backup if chosen else None
        if chosen is not None:
            row["policy"] = chosen.name
        if backup is not None and backup.schedule:
            at = next_slot(backup.schedule, backup.timezone, now)
            row["next_backup_at"] = at.isoformat() if at else None
        at, size, count = good.get(name, (None, 0, 0))
        row.update(last_good_backup_at=at.isoformat() if at else None,
                   last_good_backup_age_seconds=round((now - at).total_seconds()) if at else None,
                   points=count, stored_bytes=int(size or 0))
        state, error, when = last_backup.get(name, (None, None, None))
        row.update(last_backup_state=state, last_backup_error=error,
                   last_backup_at=when.isoformat() if when else None)
        drill = drills.get(name)
        row.update(last_drill_state=drill.state if drill else None,
                   last_drill_at=drill.started_at.isoformat() if drill else None,
                   last_drill_job=drill.id if drill else None)
        rows.append(row)
    return rows
