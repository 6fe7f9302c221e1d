"""Prometheus metrics of the API process: read from the catalog at each scrape (so every
API process reports the same fleet-wide numbers) plus this process's request counts.

- ``virtwarden_jobs{kind,state}``: jobs in the catalog.
- ``virtwarden_latest_restore_point_timestamp_seconds{domain}`` and
  ``virtwarden_latest_restore_point_age_seconds{domain}``: the newest complete point
  (when its backup started). Alert on the age, e.g. ``> 26 * 3600``. A domain that was
  due for a backup (a schedule slot) or had one asked for, within ``ACTIVE_DAYS``, but
  has no complete point has the age too, counted from its first such slot or job: so
  the same alert fires for a domain that never had a successful backup.
- ``virtwarden_backup_last_failure_timestamp_seconds{domain}`` and
  ``virtwarden_backup_consecutive_failures{domain}`` (failed backup jobs since its last
  successful one), counted over the backup jobs of the last ``ACTIVE_DAYS``.
- ``virtwarden_drill_last_success{domain}`` (1 passed, 0 failed),
  ``virtwarden_drill_last_timestamp_seconds{domain}`` and
  ``virtwarden_drill_last_recovery_seconds{domain}`` (restore + boot time), for
  domains that have finished drills.
- ``virtwarden_job_duration_seconds{kind,outcome}``: a histogram of finished jobs' run
  times (claim to end; a job that never ran, from its creation), and
  ``virtwarden_backup_stored_bytes_total{outcome}``: the bytes backups' points store. Both
  are running totals kept in the catalog (``job_totals``), counted as each job ends: use
  ``increase()`` and ``histogram_quantile()`` as with any counter.
- ``virtwarden_queued_jobs{host}``, ``virtwarden_running_jobs{host}`` and
  ``virtwarden_oldest_queued_job_age_seconds{host}``: the queue of each host (``host=""``
  for jobs not bound to one yet). A queue that grows, or an old queued job, means the
  host's worker is down or overloaded. ``virtwarden_longest_running_job_seconds{host}``:
  how long the current attempt of the job running longest has run. A job whose worker
  is alive but waits on a guest that does not answer (its QEMU stopped or stuck on its
  storage) renews its lease and holds the domain's lock for as long: only its age shows.
- ``virtwarden_service_last_seen_age_seconds{kind,node,hosts}``: how long ago each
  running worker, scheduler and listener last reported itself (catalog.services: every
  30 s; a clean stop removes its series, a dead or hung daemon's keeps growing).
- ``virtwarden_listener_backlog{node,hosts}`` and ``virtwarden_listener_lag_seconds{node,hosts}``:
  the events a listener has not handled yet (in its dispatcher's hands or queued) and how long the oldest
  has waited, as of its last report (a burst, or a catalog that answers slowly or not at
  all: triggered jobs start that much later).
- ``virtwarden_skipped_slots_total{job,cause}``: scheduled slots that were skipped, a
  running total kept in the catalog (``slot_totals``). ``cause``: ``missed`` (no
  scheduler ran while its window was open), ``waited`` (a limit held it until its window
  closed), ``failed`` (its job could not be created). Every job kind and cause is
  exported from zero, so that ``increase()`` sees the first skip.
- ``virtwarden_deferred_slots{job}`` and ``virtwarden_oldest_deferred_slot_age_seconds{job}``:
  slots waiting for a limit (``max_parallel_*``) right now, and how long the oldest has
  waited since its time came.
- ``virtwarden_storage_points{storage,format}`` and
  ``virtwarden_storage_stored_bytes{storage,format}``: the restore points each storage
  target holds (complete or damaged: not yet pruned) and the bytes they stored: format
  1, the size of their images; format 2, the bytes each point stored anew (a chunk
  shared by several points is counted once, at the point that stored it, until gc).
- ``virtwarden_repository_points{storage}``, ``virtwarden_repository_chunks{storage}``,
  ``virtwarden_repository_stored_bytes{storage}`` and
  ``virtwarden_repository_logical_bytes{storage}``: a format-2 repository as its last gc
  found it (catalog.repositories): its points, its chunks and the bytes they take, and
  the bytes of the points' disks (non-zero chunks, every point counted whole), so
  ``logical / stored`` is what deduplication and compression save together.
  ``virtwarden_repository_gc_last_timestamp_seconds{storage}``,
  ``virtwarden_repository_gc_deleted_bytes_total{storage}`` (and ``_chunks_total``), and
  ``virtwarden_repository_garbage_age_seconds{storage}``: how long chunks of deleted or
  failed points have waited for a gc (0: none wait). An age well above
  ``worker.gc_seconds`` means gc does not get to run (no worker, a backup always
  writing, a gc that fails).
  ``virtwarden_repository_damaged_chunks{storage}``: chunks a restore or verification
  found damaged and could not delete (credentials that only read), waiting for a
  backup that produces their data to store them again (no series: none wait).
- ``virtwarden_build_info{version}``: 1.
- ``virtwarden_catalog_up``: 0 when the catalog could not be read for this scrape.
- ``virtwarden_api_requests_total{route,method,status}``: requests this process served,
  by route template (``/v1/jobs/{job_id}``), never by raw path.
- ``virtwarden_api_refused_requests_total{reason}``: requests this process refused, by
  why: ``no-token``, ``not-bearer``, ``bad-token``, ``no-signature``, ``bad-signature``,
  ``replayed-signature`` (401), ``missing-scope`` (403), ``body-too-large`` and
  ``too-many-alerts`` (413), ``rate-limited`` (429). Refusals without valid credentials
  are counted here instead of being written to the audit log.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select

from virtwarden import __version__
from virtwarden.catalog import points, repositories, slots
from virtwarden.catalog.jobs import DURATION_BUCKETS, QUEUED, RUNNING
from virtwarden.catalog.models import Drill, Job, JobTotal, RestorePoint, ScheduleSlot, Service, SlotTotal, utcnow
from virtwarden.catalog.store import Catalog
from virtwarden.errors import VirtwardenError
from virtwarden.policies.schedule import SCHEDULED_JOBS

log = logging.getLogger(__name__)
DRILL_DONE = ("passed", "failed")
ACTIVE_DAYS = 7  # a domain without points is reported while it had a slot or job this recently


class CatalogCollector:
    """Gauges computed from the catalog when Prometheus scrapes."""

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat

    def describe(self) -> list[Metric]:
        return []  # collected on demand only: no catalog query at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("virtwarden_catalog_up", "1 when the catalog could be read for this scrape")
        try:
            families = list(self._families())
        except VirtwardenError as e:
            log.warning("metrics: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        info = GaugeMetricFamily("virtwarden_build_info", "the virtwarden version serving these metrics",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from families

    def _families(self) -> Iterator[Metric]:
        now = utcnow()
        with self.cat.session() as s:
            job_rows = s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            point_rows = s.execute(
                select(RestorePoint.domain, func.max(RestorePoint.created_at))
                .where(RestorePoint.status == points.COMPLETE).group_by(RestorePoint.domain)).all()
            newest = (select(Drill.domain, func.max(Drill.started_at).label("at"))
                      .where(Drill.state.in_(DRILL_DONE)).group_by(Drill.domain).subquery())
            drills = s.scalars(select(Drill).join(newest, (Drill.domain == newest.c.domain)
                                                  & (Drill.started_at == newest.c.at))).all()
            since = now - timedelta(days=ACTIVE_DAYS)
            due = dict(s.execute(select(ScheduleSlot.domain, func.min(ScheduleSlot.slot_at))
                                 .where(ScheduleSlot.job == "backup", ScheduleSlot.slot_at >= since)
                                 .group_by(ScheduleSlot.domain)).all())
            outcomes = s.execute(select(Job.domain, Job.state, Job.created_at, Job.finished_at)
                                 .where(Job.kind == "backup", Job.domain.is_not(None), Job.created_at >= since,
                                        Job.state.in_(("succeeded", "failed")))
                                 .order_by(Job.domain, Job.created_at)).all()
            totals = s.execute(select(JobTotal.kind, JobTotal.outcome, JobTotal.le, JobTotal.jobs,
                                      JobTotal.seconds, JobTotal.bytes)).all()
            services = s.execute(select(Service.kind, Service.node, Service.hosts, Service.seen_at,
                                        Service.backlog, Service.lag_seconds)).all()
            queues = s.execute(select(Job.host, Job.state, func.count(), func.min(Job.created_at),
                                      func.min(Job.started_at))
                               .where(Job.state.in_((QUEUED, RUNNING)))
                               .group_by(Job.host, Job.state)).all()
            skipped = s.execute(select(SlotTotal.job, SlotTotal.cause, SlotTotal.slots)).all()
            stored = s.execute(select(RestorePoint.storage, RestorePoint.format, func.count(),
                                      func.coalesce(func.sum(RestorePoint.size_bytes), 0))
                               .where(RestorePoint.status.in_((points.COMPLETE, points.DAMAGED)))
                               .group_by(RestorePoint.storage, RestorePoint.format)).all()
            deferred = s.execute(select(ScheduleSlot.job, func.count(), func.min(ScheduleSlot.slot_at))
                                 .where(ScheduleSlot.state == slots.DEFERRED).group_by(ScheduleSlot.job)).all()
        jobs = GaugeMetricFamily("virtwarden_jobs", "jobs in the catalog by kind and state", labels=["kind", "state"])
        for kind, state, n in job_rows:
            jobs.add_metric([kind, state], n)
        yield jobs
        ts = GaugeMetricFamily("virtwarden_latest_restore_point_timestamp_seconds",
                               "when the newest complete restore point of the domain was taken", labels=["domain"])
        age = GaugeMetricFamily("virtwarden_latest_restore_point_age_seconds",
                                "age of the newest complete restore point of the domain", labels=["domain"])
        for domain, at in point_rows:
            ts.add_metric([domain], at.timestamp())
            age.add_metric([domain], max(0.0, (now - at).total_seconds()))
        failures = _failures(outcomes)
        first_due = dict(due)  # the first slot, or the first job when that came earlier (or alone)
        for domain, (_, _, first_job) in failures.items():
            first_due[domain] = min(first_due.get(domain, first_job), first_job)
        for domain in sorted(set(first_due) - {d for d, _ in point_rows}):  # never backed up (lately)
            age.add_metric([domain], max(0.0, (now - first_due[domain]).total_seconds()))
        yield ts
        yield age
        last_failed = GaugeMetricFamily("virtwarden_backup_last_failure_timestamp_seconds",
                                        "when the domain's last failed backup job ended", labels=["domain"])
        streak = GaugeMetricFamily("virtwarden_backup_consecutive_failures",
                                   "failed backup jobs of the domain since its last successful one", labels=["domain"])
        for domain, (failed_at, count, _) in sorted(failures.items()):
            if failed_at is not None:
                last_failed.add_metric([domain], failed_at.timestamp())
            streak.add_metric([domain], count)
        yield last_failed
        yield streak
        yield from _drill_families(drills)
        yield from _total_families(totals)
        yield from _queue_families(queues, now)
        yield from _slot_families(skipped, deferred, now)
        yield from _repository_families(repositories.usage(self.cat), repositories.damaged_chunk_counts(self.cat),
                                        now)
        held = GaugeMetricFamily("virtwarden_storage_points", "restore points the storage target holds",
                                 labels=["storage", "format"])
        size = GaugeMetricFamily("virtwarden_storage_stored_bytes", "bytes the storage target's points stored",
                                 labels=["storage", "format"])
        for storage, fmt, n, total in sorted(stored):
            held.add_metric([storage, str(fmt)], n)
            size.add_metric([storage, str(fmt)], total)
        yield held
        yield size
        seen = GaugeMetricFamily("virtwarden_service_last_seen_age_seconds",
                                 "how long ago the worker, scheduler or listener last reported itself",
                                 labels=["kind", "node", "hosts"])
        backlog = GaugeMetricFamily("virtwarden_listener_backlog",
                                    "events the listener has not handled yet, as of its last report",
                                    labels=["node", "hosts"])
        lag = GaugeMetricFamily("virtwarden_listener_lag_seconds",
                                "how long the oldest event the listener has not handled yet has waited, as of its"
                                " last report", labels=["node", "hosts"])
        for kind, node, hosts, at, waiting, waited in sorted(services, key=lambda r: (r[0], r[1], r[2])):
            seen.add_metric([kind, node, hosts], max(0.0, (now - at).total_seconds()))
            if kind == "listener" and waiting is not None:
                backlog.add_metric([node, hosts], waiting)
                lag.add_metric([node, hosts], waited or 0.0)
        yield seen
        yield backlog
        yield lag


def _failures(outcomes: Sequence[Any]) -> dict[str, tuple[datetime | None, int, datetime]]:
    """Per domain, from its ended backup jobs (oldest first): when the last failed one
    ended, how many failed since the last success, and when its first job was created."""
    out: dict[str, tuple[datetime | None, int, datetime]] = {}
    for domain, state, created, finished in outcomes:
        last, count, first = out.get(domain, (None, 0, created))
        if state == "failed":
            out[domain] = (finished or created, count + 1, first)
        else:
            out[domain] = (last, 0, first)
    return out


def _total_families(rows: Sequence[Any]) -> Iterator[Metric]:
    hist = HistogramMetricFamily("virtwarden_job_duration_seconds", "run time of finished jobs",
                                 labels=["kind", "outcome"])
    stored = CounterMetricFamily("virtwarden_backup_stored_bytes", "bytes stored by the points of finished backups",
                                 labels=["outcome"])
    by_series: dict[tuple[str, str], dict[str, tuple[int, float, int]]] = {}
    for kind, outcome, le, n, seconds, size in rows:
        by_series.setdefault((kind, outcome), {})[le] = (n, seconds, size)
    stored_by: dict[str, int] = {}
    for (kind, outcome), buckets in sorted(by_series.items()):
        cumulative, out = 0, []
        for bound in [*map(str, DURATION_BUCKETS), "+Inf"]:
            cumulative += buckets.get(bound, (0, 0.0, 0))[0]
            out.append((bound, cumulative))
        hist.add_metric([kind, outcome], out, sum(b[1] for b in buckets.values()))
        if kind == "backup":
            stored_by[outcome] = stored_by.get(outcome, 0) + sum(b[2] for b in buckets.values())
    for outcome, size in sorted(stored_by.items()):
        stored.add_metric([outcome], size)
    yield hist
    yield stored


def _slot_families(skipped: Sequence[Any], deferred: Sequence[Any], now: datetime) -> Iterator[Metric]:
    total = CounterMetricFamily("virtwarden_skipped_slots", "scheduled slots skipped, by job kind and cause",
                                labels=["job", "cause"])
    counts = {(job, cause): 0 for job in SCHEDULED_JOBS for cause in slots.SKIP_CAUSES}
    counts.update({(job, cause): n for job, cause, n in skipped})
    for (job, cause), n in sorted(counts.items()):
        total.add_metric([job, cause], n)
    yield total
    waiting = GaugeMetricFamily("virtwarden_deferred_slots", "scheduled slots waiting for a limit", labels=["job"])
    oldest = GaugeMetricFamily("virtwarden_oldest_deferred_slot_age_seconds",
                               "how long the oldest slot waiting for a limit has waited since its time",
                               labels=["job"])
    for job, n, first in sorted(deferred):
        waiting.add_metric([job], n)
        oldest.add_metric([job], max(0.0, (now - first).total_seconds()))
    yield waiting
    yield oldest


def _repository_families(found: Sequence[repositories.Usage], damaged_chunks: dict[str, int],
                         now: datetime) -> Iterator[Metric]:
    labels = ["storage"]
    counts = {name: GaugeMetricFamily(f"virtwarden_repository_{name}", what, labels=labels) for name, what in (
        ("points", "points the format-2 repository held at its last gc"),
        ("chunks", "chunks the format-2 repository held after its last gc"),
        ("stored_bytes", "bytes the format-2 repository's chunks took after its last gc"),
        ("logical_bytes", "bytes of the non-zero chunks of every point's disks, at the last gc"))}
    last = GaugeMetricFamily("virtwarden_repository_gc_last_timestamp_seconds",
                             "when the last gc of the format-2 repository ended", labels=labels)
    deleted = CounterMetricFamily("virtwarden_repository_gc_deleted_bytes", "bytes of unused chunks gc deleted",
                                  labels=labels)
    deleted_chunks = CounterMetricFamily("virtwarden_repository_gc_deleted_chunks", "unused chunks gc deleted",
                                         labels=labels)
    waiting = GaugeMetricFamily("virtwarden_repository_garbage_age_seconds",
                                "how long chunks of deleted or failed points have waited for a gc (0: none)",
                                labels=labels)
    for u in found:
        for name, value in (("points", u.points), ("chunks", u.chunks), ("stored_bytes", u.stored_bytes),
                            ("logical_bytes", u.logical_bytes)):
            if value is not None:
                counts[name].add_metric([u.storage], value)
        if u.gc_finished_at is not None:
            last.add_metric([u.storage], u.gc_finished_at.timestamp())
        deleted.add_metric([u.storage], u.deleted_bytes)
        deleted_chunks.add_metric([u.storage], u.deleted_chunks)
        since = u.garbage_since
        waiting.add_metric([u.storage], max(0.0, (now - since).total_seconds()) if since else 0.0)
    damaged = GaugeMetricFamily("virtwarden_repository_damaged_chunks",
                                "chunks found damaged that could not be deleted, waiting for a backup to store "
                                "them again", labels=labels)
    for storage, n in sorted(damaged_chunks.items()):
        damaged.add_metric([storage], n)
    yield from counts.values()
    yield from (last, deleted, deleted_chunks, waiting, damaged)


def _queue_families(rows: Sequence[Any], now: datetime) -> Iterator[Metric]:
    queued = GaugeMetricFamily("virtwarden_queued_jobs", "jobs waiting for a worker, by host", labels=["host"])
    running = GaugeMetricFamily("virtwarden_running_jobs", "jobs a worker is running, by host", labels=["host"])
    oldest = GaugeMetricFamily("virtwarden_oldest_queued_job_age_seconds",
                               "how long the oldest job waiting for a worker has waited, by host", labels=["host"])
    longest = GaugeMetricFamily("virtwarden_longest_running_job_seconds",
                                "how long the attempt of the job running longest has run, by host", labels=["host"])
    for host, state, n, first, started in sorted(rows, key=lambda r: (r[0] or "", r[1])):
        if state == QUEUED:
            queued.add_metric([host or ""], n)
            oldest.add_metric([host or ""], max(0.0, (now - first).total_seconds()))
        else:
            running.add_metric([host or ""], n)
            if started is not None:
                longest.add_metric([host or ""], max(0.0, (now - started).total_seconds()))
    yield queued
    yield running
    yield oldest
    yield longest


def _drill_families(drills: Sequence[Drill]) -> Iterator[Metric]:
    ok = GaugeMetricFamily("virtwarden_drill_last_success", "1 when the last restore drill passed, else 0",
                           labels=["domain"])
    when = GaugeMetricFamily("virtwarden_drill_last_timestamp_seconds", "when the last restore drill started",
                             labels=["domain"])
    rto = GaugeMetricFamily("virtwarden_drill_last_recovery_seconds",
                            "restore plus boot time of the last restore drill (measured recovery time)",
                            labels=["domain"])
    for d in drills:
        ok.add_metric([d.domain], 1 if d.state == "passed" else 0)
        when.add_metric([d.domain], d.started_at.timestamp())
        if d.restore_seconds is not None:
            rto.add_metric([d.domain], d.restore_seconds + (d.boot_seconds or 0.0))
    yield ok
    yield when
    yield rto


class ApiMetrics:
    """The registry /metrics serves, and the request counter the middleware feeds."""

    def __init__(self, cat: Catalog) -> None:
        disable_created_metrics()  # *_created series only double the output
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CatalogCollector(cat))  # type: ignore[arg-type]
        self.requests = Counter("virtwarden_api_requests", "HTTP requests served by this API process",
                                ["route", "method", "status"], registry=self.registry)
        self.refused = Counter("virtwarden_api_refused_requests", "requests this API process refused, by why",
                               ["reason"], registry=self.registry)

    def count_refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()


class RequestCounter:
    """ASGI middleware: counts every request by route template, method and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, metrics: ApiMetrics,
                 route_of: Callable[[dict[str, Any]], str]) -> None:
        self.app, self.metrics, self.route_of = app, metrics, route_of

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(self.route_of(scope), scope["method"], str(status[0])).inc()
