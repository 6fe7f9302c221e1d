"""Turning a request (CLI, API, scheduler) into a job row and a message to a worker.

The request is resolved completely here (which host, which storage, which settings),
so the job row holds everything the job needs and the worker makes no new decisions.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from catalog import jobs
from catalog.store import Catalog
from hypervisor.types import DomainInfo
from policies import parse_metadata, resolve_backup
from virtwarden.config import Config
from virtwarden.errors import DomainNotFound, HypervisorUnavailable, JobFailed, VirtwardenError

log = logging.getLogger(__name__)


def find_host(cfg: Config, domain: str, host: str | None = None) -> tuple[str, DomainInfo]:
    """The configured host that has ``domain`` (asking libvirt), or ``host`` when given."""
    from hypervisor.libvirt_host import LibvirtHost

    candidates = [host] if host else list(cfg.hosts)
    unreachable = []
    for name in candidates:
        try:
            with LibvirtHost(name, cfg.host(name).uri) as hv:
                return name, hv.domain(domain)
        except DomainNotFound:
            continue
        except HypervisorUnavailable as e:
            unreachable.append(str(e))
    where = f"host {host}" if host else f"any configured host ({', '.join(candidates)})"
    detail = f"; unreachable: {'; '.join(unreachable)}" if unreachable else ""
    raise DomainNotFound(f"no domain {domain!r} on {where}{detail}")


def follow_domain(cfg: Config, cat: Catalog, job: jobs.JobView, owner: str, hv) -> str | None:  # noqa: ANN001
    """A claimed job whose domain is not on the job's host (``hv``) any more: send it to
    the host where the domain runs now and return that host's name; None when the
    domain is here. DomainNotFound (the job then fails saying so) when no configured
    host has it."""
    from hypervisor import domains
    from worker import celery_app

    if job.domain is None or domains.exists(hv, job.domain):
        return None
    host, _ = find_host(cfg, job.domain)
    why = f"domain {job.domain} left host {hv.name}: re-routed to {host}"
    moved = jobs.move(cat, job.id, owner, host, why)
    if moved is not None:
        log.info("job %s: %s", job.id, why)
        celery_app.send(moved)
    return host


def backup(cfg: Config, cat: Catalog, domain: str, *, policy: str | None = None, target: str | None = None,
           full: bool = False, host: str | None = None, requested_by: str | None = None,
           dedup_key: str | None = None) -> jobs.JobView:
    from worker import celery_app

    host, info = find_host(cfg, domain, host)
    settings = resolve_backup(cfg, domain, policy=policy, target=target, host=host,
                              metadata=parse_metadata(info.xml))
    cfg.storage_target(settings.target)  # unknown storage: fail before anything is written
    celery_app.check_broker(cfg)
    return enqueue(cfg, cat, "backup", domain, host, settings.job_params(domain, full=full), requested_by,
                   dedup_key=dedup_key)


def restore(cfg: Config, cat: Catalog, domain: str, *, point: str = "latest", at: datetime | None = None,
            to_dir: str | None = None, as_domain: str | None = None, in_place: bool = False,
            discard_old: bool = False, start: bool = False, host: str | None = None,
            requested_by: str | None = None, dedup_key: str | None = None) -> jobs.JobView:
    from tasks.restore import resolve_point
    from worker import celery_app

    if as_domain is not None or in_place or at is not None:
        what = ("restoring as a new domain" if as_domain is not None else "restoring in place" if in_place
                else "choosing a point by time")
        raise VirtwardenError(f"{what} is not supported yet: restore a point id or 'latest' into a directory")
    if not to_dir:
        raise VirtwardenError("a restore needs a destination: to_dir, as_domain or in_place")
    # Resolve now so a wrong domain or point is an error here, not in a worker.
    resolved = resolve_point(cat, domain, point)
    host = host or (resolved.host if resolved.host in cfg.hosts else next(iter(cfg.hosts)))
    celery_app.check_broker(cfg)
    params = {"domain": domain, "point": resolved.id, "to_dir": to_dir}
    return enqueue(cfg, cat, "restore", domain, host, params, requested_by, dedup_key=dedup_key)


def enqueue(cfg: Config, cat: Catalog, kind: str, domain: str | None, host: str, params: dict,
            requested_by: str | None, *, dedup_key: str | None = None) -> jobs.JobView:
    """Create the job row and send it to the host's queue. With ``dedup_key``, a job that
    already has the key is returned as it is and nothing is sent again."""
    from worker import celery_app

    job, created = jobs.create_once(cat, kind=kind, domain=domain, host=host, params=params,
                                    max_attempts=cfg.worker.max_attempts, requested_by=requested_by,
                                    dedup_key=dedup_key)
    if not created:
        return job
    try:
        celery_app.send(job)
    except VirtwardenError as e:
        jobs.fail_queued(cat, job.id, f"could not be sent to a worker: {e}")
        raise
    return job


def wait(cat: Catalog, job_id: str, *, on_progress: Callable[[jobs.JobView], None] | None = None,
         poll: float = 0.25, timeout: float | None = None) -> jobs.JobView:
    """Block until the job finished; JobFailed when it failed."""
    start = time.monotonic()
    while True:
        job = jobs.get(cat, job_id)
        if on_progress:
            on_progress(job)
        if job.finished:
            if job.state == jobs.FAILED:
                raise JobFailed(f"job {job.id} ({job.kind} of {job.domain}) failed: {job.error}")
            return job
        if timeout is not None and time.monotonic() - start > timeout:
            raise JobFailed(f"job {job.id} still {job.state} after {timeout:.0f}s")
        time.sleep(poll)
