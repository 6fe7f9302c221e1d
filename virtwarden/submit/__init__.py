"""One way to submit a job: ``plan`` says what a request would do, ``submit`` creates
its job row and sends it to a worker. The CLI, the API, the listener, the scheduler,
alerts and runbooks all go through the table ``KINDS``: one planner per job kind, in the
module of this package named for it.

A planner resolves the request completely (which host, which storage, which settings,
from the policies and the catalog, asking libvirt where it must) and returns a
``Planned``; it writes nothing. So the job row holds everything the job needs and the
worker makes no new decisions, and every refusal (unknown domain, point or storage, a
destination outside restore.allowed_dirs, ...) comes before any job exists.
"""
from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwarden.catalog import jobs
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import DatabaseUnavailable, JobFailed, UsageError, VirtwardenError
from virtwarden.policies.model import Policy
from virtwarden.policies.select import DomainFacts

log = logging.getLogger(__name__)

# How long a waiter reads an unreachable catalog again before it gives up (a PostgreSQL
# restart or failover takes seconds to a minute), and how often meanwhile.
OUTAGE_SECONDS = 120.0
OUTAGE_POLL = 0.5


@dataclass(frozen=True)
class Planned:
    """A request resolved: the job row it becomes (``kind``: a restore's depends on its
    mode) and what a dry run shows (``preview``)."""

    kind: str
    domain: str | None
    host: str
    params: dict[str, Any]
    preview: dict[str, Any] = field(default_factory=dict)


# kind -> "module:function" of its planner, ``planner(cfg, cat, subject, **options) ->
# Planned``; ``subject`` is the domain (a host for evacuate; None for every domain where
# the kind allows it). Imported when first used.
KINDS: dict[str, str] = {
    "backup": "virtwarden.submit.backup:plan_backup",
    "snapshot": "virtwarden.submit.backup:plan_snapshot",
    "restore": "virtwarden.submit.restore:plan_restore_job",
    "drill": "virtwarden.submit.drill:plan_drill",
    "verify": "virtwarden.submit.verify:plan_verify_job",
    "prune": "virtwarden.submit.prune:plan_prune",
    "evacuate": "virtwarden.submit.evacuate:plan_evacuate",
    "gc": "virtwarden.submit.gc:plan_gc",
}


def planner(kind: str) -> Callable[..., Planned]:
    if kind not in KINDS:
        raise UsageError(f"no job kind {kind!r} can be submitted (known: {', '.join(KINDS)})")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def plan(cfg: Config, cat: Catalog, kind: str, subject: str | None, **options: Any) -> Planned:
    """What a request of ``kind`` would do; changes nothing (the dry run)."""
    return planner(kind)(cfg, cat, subject, **options)


def submit(cfg: Config, cat: Catalog, kind: str, subject: str | None, *, requested_by: str | None,
           dedup_key: str | None = None, interactive: bool = True, **options: Any) -> jobs.JobView:
    """Plan the request, then create its job and send it. With ``dedup_key``, a job
    already created with that key is returned as it is (a repeated webhook or event
    starts one job, not two). ``interactive`` (CLI, API, runbooks): a dead broker is an
    error now and nothing is created; otherwise (an event, a schedule, an alert's
    backups) the job is created anyway and the outbox sends it when the broker is back."""
    if dedup_key:
        existing = jobs.by_dedup_key(cat, dedup_key)
        if existing is not None:
            return existing
    planned = plan(cfg, cat, kind, subject, **options)
    return submit_planned(cfg, cat, planned, requested_by=requested_by, dedup_key=dedup_key, interactive=interactive)


def submit_planned(cfg: Config, cat: Catalog, planned: Planned, *, requested_by: str | None,
                   dedup_key: str | None = None, interactive: bool = True) -> jobs.JobView:
    """Create and send the job of a request already planned (a caller that showed the
    plan first need not plan it again); ``interactive`` as for ``submit``."""
    from virtwarden.worker import celery_app

    if interactive:
        celery_app.check_broker(cfg)
    return enqueue(cfg, cat, planned.kind, planned.domain, planned.host, planned.params, requested_by,
                   dedup_key=dedup_key, interactive=interactive)


def catalog_facts(cfg: Config, cat: Catalog, domain: str, policies: list[Policy],
                  host: str | None = None) -> DomainFacts:
    """What policy selection may know of ``domain`` without asking libvirt (a domain
    that is gone can still be drilled and pruned): its name, ``host`` or else the host
    of its newest complete restore point, and the virtwarden metadata saved with that
    point (read from its manifest only when some policy selects by metadata)."""
    from virtwarden.catalog import points
    from virtwarden.policies import parse_metadata
    from virtwarden.storage_backends import open_backend
    from virtwarden.storage_backends.format2.access import repositories
    from virtwarden.tasks.restore import point_manifest

    usable = points.for_domain(cat, domain, statuses=(points.COMPLETE,))
    if not usable:
        return DomainFacts(domain, host)
    newest = usable[-1]
    metadata: dict[str, str] = {}
    if any(p.spec.selector.metadata for p in policies):
        backend = open_backend(newest.storage, cfg.storage_target(newest.storage))
        try:
            manifest = point_manifest(newest, backend, repositories(cfg))
        finally:
            backend.close()
        metadata = parse_metadata(manifest["domain"]["xml"])
    return DomainFacts(domain, host or newest.host, metadata)


def enqueue(cfg: Config, cat: Catalog, kind: str, domain: str | None, host: str, params: dict,
            requested_by: str | None, *, dedup_key: str | None = None, interactive: bool = True,
            send: bool = True) -> jobs.JobView:
    """Create the job row, then send it to the host's queue. With ``dedup_key``, a job that
    already has the key is returned as it is and nothing is sent again.

    The row is written first and is its own outbox entry (``catalog.jobs``): when the
    send fails, a request nobody waits for (``interactive=False``: the scheduler, the
    listener, an alert) stays queued and the sweeper sends it once the broker is back. An
    interactive request (CLI, API) checked the broker before and is told instead: its
    job is failed, so nothing runs later that its requester was told had failed. With
    ``send=False`` (the caller knows the broker is down) the job is only created, due
    for the sweeper's next round."""
    from virtwarden.worker import celery_app

    job, created = jobs.create_once(cat, kind=kind, domain=domain, host=host, params=params,
                                    max_attempts=cfg.worker.max_attempts, requested_by=requested_by,
                                    dedup_key=dedup_key, resend_after=cfg.worker.resend_seconds if send else 0)
    if not created or not send:
        return job
    try:
        celery_app.send(job)
    except VirtwardenError as e:
        if interactive:
            jobs.fail_queued(cat, job.id, f"could not be sent to a worker: {e}")
            raise
        log.warning("job %s (%s of %s): %s; it stays queued and is sent when the broker is back", job.id, kind,
                    domain, e)
        jobs.postpone(cat, job.id, 0)  # due for the sweeper's next round
        return job
    jobs.mark_sent(cat, job, resend_after=cfg.worker.resend_seconds)
    return job


@dataclass(frozen=True)
class Request:
    """A planned request to create and send, with who asked and its dedup key."""

    planned: Planned
    requested_by: str | None
    dedup_key: str | None = None


def enqueue_many(cfg: Config, cat: Catalog, requests: list[Request]) -> list[jobs.JobView]:
    """``enqueue`` for many requests nobody waits for (``interactive=False``: the
    listener's triggers): their jobs created in one transaction, their messages sent in
    pipelined batches (``celery_app.send_many``), the sends recorded in one statement.
    Jobs whose message did not go stay queued and due, and the sweeper sends them when
    the broker is back. A dedup key created meanwhile by another process makes the batch
    fall back to one request at a time. Each request's job, in order."""
    from sqlalchemy.exc import IntegrityError

    values = [jobs.new_values(kind=r.planned.kind, domain=r.planned.domain, host=r.planned.host,
                              params=r.planned.params, max_attempts=cfg.worker.max_attempts,
                              dedup_key=r.dedup_key, requested_by=r.requested_by) for r in requests]
    try:
        created = jobs.create_many(cat, values, resend_after=cfg.worker.resend_seconds)
    except IntegrityError:
        return [enqueue(cfg, cat, r.planned.kind, r.planned.domain, r.planned.host, r.planned.params,
                        r.requested_by, dedup_key=r.dedup_key, interactive=False) for r in requests]
    send_created(cfg, cat, [job for job, new in created if new])
    return [job for job, _ in created]


def send_created(cfg: Config, cat: Catalog, made: list[jobs.JobView], *,
                 send_many: Callable[[list[jobs.JobView]], tuple[list[jobs.JobView], Exception | None]]
                 | None = None) -> None:
    """Send jobs just created for requests nobody waits for (the scheduler's slots, the
    listener's triggers) and record the sends; the jobs whose message did not go stay
    queued and due, and the sweeper sends them when the broker is back. ``send_many``:
    ``celery_app.send_many`` unless given (a ``celery_app.Publisher``'s)."""
    from virtwarden.worker import celery_app

    sent, error = (send_many or celery_app.send_many)(made)
    if error is not None:
        went = {job.id for job in sent}
        unsent = [job for job in made if job.id not in went]
        log.warning("%s; %d jobs stay queued and are sent when the broker is back", error, len(unsent))
        for job in unsent:
            jobs.postpone(cat, job.id, 0)  # due for the sweeper's next round
    jobs.mark_sent_many(cat, sent, resend_after=cfg.worker.resend_seconds)


def job_failed(job: jobs.JobView) -> JobFailed:
    """A failed job as an error: with the exit code of the product error that failed it
    (6 for a full storage, 5 for an unreachable one, ...), else 1."""
    failure = JobFailed(f"job {job.id} ({job.kind} of {job.domain}) failed: {job.error}")
    code = (job.result or {}).get("exit_code")
    if isinstance(code, int) and code > 0:
        failure.exit_code = code
    return failure


def wait(cat: Catalog, job_id: str, *, on_progress: Callable[[jobs.JobView], None] | None = None,
         poll: float = 0.05, poll_max: float = 0.2, steady: float = 10.0, timeout: float | None = None,
         outage: float = OUTAGE_SECONDS) -> jobs.JobView:
    """Block until the job finished; JobFailed when it failed. The catalog is read every
    ``poll`` seconds for the first ``steady`` seconds (most jobs a person waits for end
    by then: their end is seen within 0.05 s), then less often, up to every
    ``poll_max``: a long job's end is seen within 0.2 s, at the cost of reading one row
    five times a second while it runs (a primary-key lookup: nothing for SQLite or
    PostgreSQL).

    A catalog that cannot be read (a PostgreSQL restarting or failing over) is read
    again every ``OUTAGE_POLL`` seconds for up to ``outage`` seconds before
    DatabaseUnavailable is raised. The job does not need the waiter: it goes on, and a
    waiter that gave up at the first failed read would report a failure (and stop a
    runbook) for a job that then succeeds."""
    start = time.monotonic()
    unreachable_since: float | None = None
    while True:
        try:
            job = jobs.get(cat, job_id)
        except DatabaseUnavailable as e:
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
                log.warning("job %s: the catalog cannot be read (%s); reading it again for up to %.0f s",
                            job_id, e, outage)
            if now - unreachable_since >= outage or (timeout is not None and now - start > timeout):
                raise DatabaseUnavailable(f"job {job_id}: the catalog could not be read for "
                                          f"{now - unreachable_since:.0f} s, so its end is not known; the job "
                                          f"goes on without this wait (virtwarden job {job_id} says how it "
                                          f"ended): {e}") from e
            time.sleep(OUTAGE_POLL)
            continue
        if unreachable_since is not None:
            log.warning("job %s: the catalog can be read again after %.1f s", job_id,
                        time.monotonic() - unreachable_since)
            unreachable_since = None
        if on_progress:
            on_progress(job)
        if job.finished:
            if job.state == jobs.FAILED:
                raise job_failed(job)
            return job
        if timeout is not None and time.monotonic() - start > timeout:
            raise JobFailed(f"job {job.id} still {job.state} after {timeout:.0f}s")
        time.sleep(poll)
        if time.monotonic() - start > steady:
            poll = min(poll * 1.25, poll_max)
