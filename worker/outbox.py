"""Nothing queued is forgotten: the sweep every worker and the scheduler run.

The job row is written before its message is sent, and it is the outbox entry: a
queued job whose ``dispatch_at`` passed has no message on its way that anyone has
seen (the send failed while the broker was down, Redis restarted without its data, a
worker died holding a delayed retry). ``sweep`` then

1. reaps jobs whose worker stopped renewing its lease (``catalog.jobs.reap``), queueing
   them again, due for sending at once, or giving them up (a job whose kind has a
   recovery runs it once more first);
2. sends every queued job whose message is overdue (the ones just reaped among them),
   oldest first, stopping at the first broker error (the next sweep tries again; nothing
   is marked sent that was not);
3. now and then, unlists points left ``writing`` by jobs that ended (``tasks.sweep``);
4. every ``catalog.prune_seconds``, deletes audit, event, alert and idempotency-key rows
   older than the ``catalog`` section keeps them (``catalog.housekeeping``);
5. submits a gc job for each format-2 repository that has unused chunks and no gc
   started within ``worker.gc_seconds`` (``catalog.repositories``; the job's dedup key
   names the period, so several sweepers submit one).

Sending twice is harmless: a worker's claim is a guarded update, so a duplicate finds
the job claimed or finished and does nothing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from virtwarden.catalog import jobs
from virtwarden.catalog.store import Catalog

from virtwarden.config import Config
from virtwarden.errors import BrokerUnavailable, VirtwardenError

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    unsent: int = 0  # overdue jobs left for the next sweep (the broker is down)
    points: list[str] = field(default_factory=list)  # unfinished points unlisted
    pruned: dict[str, int] = field(default_factory=dict)  # old catalog rows deleted, by kind
    collecting: list[str] = field(default_factory=list)  # storage targets a gc job was submitted for
    problems: list[str] = field(default_factory=list)


class Sweeper:
    """Keeps the times of its last points sweep and row pruning; one per process.
    ``send`` hands a job to its host's queue (``worker.celery_app.send``), raising
    BrokerUnavailable when the broker is down."""

    def __init__(self, cfg: Config, cat: Catalog, send: Callable[[jobs.JobView], None]) -> None:
        self.cfg, self.cat, self.send = cfg, cat, send
        self._points_swept = 0.0
        self._rows_pruned: float | None = None  # None: not yet in this process

    def sweep(self) -> SweepReport:
        report = SweepReport()
        try:
            self._reap(report)
            self._resend(report)
            if time.monotonic() - self._points_swept >= self.cfg.worker.sweep_seconds:
                self._sweep_points(report)
            if self._rows_pruned is None or time.monotonic() - self._rows_pruned >= self.cfg.catalog.prune_seconds:
                self._prune_rows(report)
            if self.cfg.worker.gc_seconds is not None:
                self._collect_garbage(report, self.cfg.worker.gc_seconds)
        except VirtwardenError as e:  # the catalog is unreachable: the next sweep tries again
            log.warning("sweep: %s", e)
            report.problems.append(str(e))
        return report

    def _reap(self, report: SweepReport) -> None:
        from virtwarden.worker.runner import recoverable

        for job in jobs.reap(self.cat, recoverable=recoverable):
            report.requeued.append(job.id)
            if job.give_up:
                log.warning("job %s: its last attempt was lost; queued once more to run its recovery", job.id)
            else:
                log.warning("job %s: its worker stopped renewing the lease; requeued (attempt %d of %d)",
                            job.id, job.attempts + 1, job.max_attempts)

    def _resend(self, report: SweepReport) -> None:
        due = jobs.due_for_send(self.cat)
        for i, job in enumerate(due):
            try:
                self.send(job)
            except BrokerUnavailable as e:
                report.unsent = len(due) - i
                log.warning("sweep: %d queued job(s) wait for the broker: %s", report.unsent, e)
                return
            if jobs.mark_sent(self.cat, job, resend_after=self.cfg.worker.resend_seconds):
                report.resent.append(job.id)
                log.info("job %s: (re)sent to host %s's queue (send %d)", job.id, job.host, job.sends + 1)

    def _sweep_points(self, report: SweepReport) -> None:
        from virtwarden.storage_backends import open_backend
        from virtwarden.tasks.sweep import sweep_unfinished_points

        report.points = sweep_unfinished_points(
            self.cat, lambda name: open_backend(name, self.cfg.storage_target(name)))
        self._points_swept = time.monotonic()

    def _prune_rows(self, report: SweepReport) -> None:
        from virtwarden.catalog.housekeeping import prune_rows

        keep = self.cfg.catalog
        report.pruned = prune_rows(self.cat, {"audit": keep.audit_days, "events": keep.events_days,
                                              "alerts": keep.alerts_days, "idempotency": keep.idempotency_days,
                                              "jobs": keep.jobs_days, "slots": keep.slots_days,
                                              "points": keep.points_days, "drills": keep.drills_days,
                                              "snapshots": keep.snapshots_days, "overlays": keep.overlays_days})
        self._rows_pruned = time.monotonic()
        if any(report.pruned.values()):
            log.info("sweep: deleted old catalog rows: %s",
                     ", ".join(f"{n} {kind}" for kind, n in report.pruned.items() if n))

    def _collect_garbage(self, report: SweepReport, every: float) -> None:
        from virtwarden.catalog import repositories

        from virtwarden import submit

        for storage in repositories.due_for_gc(self.cat, every):
            if storage not in self.cfg.storage or self.cfg.storage[storage].format != 2:
                continue  # not configured here (any more): another configuration's worker may collect it
            key = f"gc:{storage}:{int(time.time() // every)}"
            if jobs.by_dedup_key(self.cat, key) is not None:
                continue  # submitted this period already (by this sweeper or another)
            if jobs.unfinished_by_key(self.cat, f"gc:{storage}:"):
                continue  # one of an earlier period still waits for a worker, or runs
            try:
                job = submit.submit(self.cfg, self.cat, "gc", storage, requested_by="sweep", dedup_key=key,
                                    interactive=False)
            except VirtwardenError as e:
                log.warning("sweep: no gc of storage %s now: %s", storage, e)
                continue
            report.collecting.append(storage)
            log.info("sweep: storage %s has unused chunks: gc job %s", storage, job.id)
