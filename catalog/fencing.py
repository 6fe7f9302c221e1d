"""Fencing: only the attempt that holds a job's newest token may change anything.

A lease alone does not stop a worker that was paused (SIGSTOP, a long GC, a VM
migration of the worker itself) from acting when it wakes after another worker took its
job over. So every claim raises the job's ``fence``; the attempt keeps the value its claim
set (a ``Fence``), and:

- every catalog transaction a job opens that writes anything first runs ``guard``: a
  compare-and-set on the job row (this fence, still running) that also renews the lease.
  It matches no row once another attempt claimed the job, or the reaper took it back,
  and the transaction is rolled back with ``LeaseLost``. On PostgreSQL the UPDATE locks
  the job row, so a guarded transaction and a takeover are strictly ordered;
- every step that changes something outside the catalog (abort a libvirt job, commit or
  delete an overlay, delete a checkpoint or a stored object, swap disks) is preceded by
  ``Catalog.check_owner``, the same guard in a transaction of its own. A takeover needs
  the lease to have expired by the database's clock, and the guard has just renewed it,
  so the step runs with a whole lease period of margin.

See ``Catalog.fenced`` for how a job's catalog applies the guard to its writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from virtwarden.catalog.clock import db_later
from virtwarden.catalog.models import Job

from virtwarden.errors import LeaseLost

RUNNING = "running"


@dataclass(frozen=True)
class Fence:
    """One attempt's hold on a job: its id, the token its claim set, its lease length."""

    job_id: str
    token: int
    lease_seconds: float


def guard(conn: Any, fence: Fence, action: str = "change the catalog") -> None:
    """Renew the attempt's lease if it still holds the job; LeaseLost otherwise. Runs on
    ``conn`` (a Connection inside the caller's transaction), so the caller's writes and
    this check commit or roll back together."""
    done = conn.execute(
        update(Job).where(Job.id == fence.job_id, Job.fence == fence.token, Job.state == RUNNING)
        .values(lease_expires_at=db_later(fence.lease_seconds))
    )
    if int(done.rowcount) != 1:
        raise LeaseLost(f"job {fence.job_id}: attempt with token {fence.token} no longer owns the job "
                        f"(another worker took it over, or it ended); not going to {action}")
