"""Turning a request (CLI, API, scheduler) into a job row and a message to a worker.

The request is resolved completely here (which host, which storage, which settings),
so the job row holds everything the job needs and the worker makes no new decisions.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from catalog import jobs
from catalog.fencing import Fence
from catalog.store import Catalog
from hypervisor.types import DomainInfo, Hypervisor
from policies import parse_metadata, resolve_backup
from virtwarden.config import Config
from virtwarden.errors import BrokerUnavailable, DomainNotFound, HypervisorUnavailable, JobFailed, VirtwardenError

if TYPE_CHECKING:
    from tasks.restore_plan import RestorePlan

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


def follow_domain(cfg: Config, cat: Catalog, job: jobs.JobView, fence: Fence, hv: Hypervisor) -> str | None:
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
    moved = jobs.move(cat, fence, host, why, resend_after=cfg.worker.resend_seconds)
    if moved is not None:
        log.info("job %s: %s", job.id, why)
        try:
            celery_app.send(moved)
        except BrokerUnavailable as e:  # the outbox sends it once the broker is back
            log.warning("job %s: %s; it stays queued", job.id, e)
    return host


def backup(cfg: Config, cat: Catalog, domain: str, *, policy: str | None = None, target: str | None = None,
           full: bool = False, host: str | None = None, requested_by: str | None = None,
           dedup_key: str | None = None, interactive: bool = True) -> jobs.JobView:
    """Queue a backup. ``interactive`` (CLI, API): a dead broker is an error now and
    nothing is created; otherwise (an event, an alert) the job is created anyway and
    the outbox sends it when the broker is back."""
    from worker import celery_app

    host, info = find_host(cfg, domain, host)
    settings = resolve_backup(cfg, domain, policy=policy, target=target, host=host,
                              metadata=parse_metadata(info.xml))
    cfg.storage_target(settings.target)  # unknown storage: fail before anything is written
    if interactive:
        celery_app.check_broker(cfg)
    return enqueue(cfg, cat, "backup", domain, host, settings.job_params(domain, full=full), requested_by,
                   dedup_key=dedup_key, interactive=interactive)


RESTORE_KINDS = {"to-dir": "restore", "as-domain": "restore-as-domain", "in-place": "restore-in-place"}


def restore(cfg: Config, cat: Catalog, domain: str, *, point: str = "latest", at: str | datetime | None = None,
            to_dir: str | None = None, as_domain: str | None = None, in_place: bool = False,
            discard_old: bool = False, start: bool = False, host: str | None = None,
            requested_by: str | None = None, dedup_key: str | None = None, disk_dir: str | None = None,
            shutdown_timeout: float | None = None, confined: bool = True) -> jobs.JobView:
    """Check and plan a restore (see ``plan_restore``), then create its job. Every
    refusal (unknown point, a name or file in the way, a disk that does not fit, a
    destination outside restore.allowed_dirs) is raised here, before any job exists.
    With ``dedup_key``, a job already created with that key is returned as it is (a
    repeated webhook starts one restore, not two).

    ``confined`` (the API, runbooks): to_dir and disk_dir must be under
    restore.allowed_dirs, and the job says so, so that the worker checks again right
    before it writes. Only a restore that root starts from the command line passes
    False (``restore_confined``)."""
    from worker import celery_app

    if shutdown_timeout is not None and not in_place:
        from tasks.restore import InvalidRestoreRequest

        raise InvalidRestoreRequest("--shutdown-timeout goes with --in-place only")
    if dedup_key:
        existing = jobs.by_dedup_key(cat, dedup_key)
        if existing is not None:
            return existing
    plan = plan_restore(cfg, cat, domain, point=point, at=at, to_dir=to_dir, as_domain=as_domain,
                        in_place=in_place, discard_old=discard_old, start=start, host=host, disk_dir=disk_dir,
                        confined=confined)
    celery_app.check_broker(cfg)
    params: dict = {"domain": domain, "point": plan.point.id}
    if plan.mode == "to-dir":
        params.update(to_dir=plan.to_dir, confined=confined)
    elif plan.mode == "as-domain":
        params.update(as_domain=as_domain, uuid=str(uuid.uuid4()), disk_dir=disk_dir, start=start,
                      confined=confined)
    else:
        params.update(discard_old=discard_old, start=start)
        if shutdown_timeout is not None:
            params["shutdown_timeout"] = float(shutdown_timeout)
    return enqueue(cfg, cat, RESTORE_KINDS[plan.mode], domain, plan.host, params, requested_by,
                   dedup_key=dedup_key)


def plan_restore(cfg: Config, cat: Catalog, domain: str, *, point: str = "latest",
                 at: str | datetime | None = None, to_dir: str | None = None, as_domain: str | None = None,
                 in_place: bool = False, discard_old: bool = False, start: bool = False,
                 host: str | None = None, disk_dir: str | None = None, confined: bool = True) -> RestorePlan:
    """What the restore would do (``tasks.restore_plan``), changing nothing: the dry run.
    Reads the catalog, the chain's manifests and, for a new domain or in place, asks
    the host's libvirt; creates no job. A ``confined`` request's to_dir and disk_dir
    outside restore.allowed_dirs are refused first, before anything is looked up."""
    from storage_backends import open_backend
    from tasks.restore import describe_selection, load_chain, resolve_point
    from tasks.restore_plan import Destination, check_paths, confine_destination
    from tasks.restore_plan import plan_restore as make_plan

    dest = Destination.from_options(to_dir=to_dir, as_domain=as_domain, in_place=in_place, disk_dir=disk_dir,
                                    start=start, discard_old=discard_old)
    if confined:
        confine_destination(dest, cfg.restore_roots)
    resolved = resolve_point(cat, domain, point, at=at)
    live = None
    if dest.mode == "in-place":
        from hypervisor.libvirt_host import LibvirtHost
        from tasks.restore_domain import inspect_host

        try:
            host, _ = find_host(cfg, domain, host)
        except DomainNotFound as e:
            raise DomainNotFound(f"{e}: there is nothing to restore in place; to bring it back, restore it "
                                 f"--as-domain {domain}") from e
        with LibvirtHost(host, cfg.host(host).uri) as hv:
            live = inspect_host(cat, hv, domain)
    else:
        host = host or (resolved.host if resolved.host in cfg.hosts else next(iter(cfg.hosts)))
        cfg.host(host)  # an unknown host is an error now
    backend = open_backend(resolved.storage, cfg.storage_target(resolved.storage))
    try:
        chain = load_chain(cat, backend, resolved)
    finally:
        backend.close()
    plan = make_plan(chain.points, chain.manifests, dest, host=host, selected=describe_selection(point, at),
                     live=live)
    check_paths(plan)
    if dest.mode == "as-domain":
        _refuse_existing_domain(cfg, host, as_domain or "")
    return plan


def restore_confined(euid: int | None = None) -> bool:
    """Whether a restore started from the command line is confined to
    restore.allowed_dirs: unless root runs it (root may write anywhere anyway; anyone
    else must not make a worker that runs as root write where they could not)."""
    return (os.geteuid() if euid is None else euid) != 0


def _refuse_existing_domain(cfg: Config, host: str, name: str) -> None:
    from hypervisor import domains
    from hypervisor.libvirt_host import LibvirtHost
    from tasks.restore import RestoreRefused

    with LibvirtHost(host, cfg.host(host).uri) as hv:
        if domains.exists(hv, name):
            raise RestoreRefused(f"host {host} already has a domain named {name!r}; choose another name "
                                 "(nothing was changed)")


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
    from worker import celery_app

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


def job_failed(job: jobs.JobView) -> JobFailed:
    """A failed job as an error: with the exit code of the product error that failed it
    (6 for a full storage, 5 for an unreachable one, ...), else 1."""
    failure = JobFailed(f"job {job.id} ({job.kind} of {job.domain}) failed: {job.error}")
    code = (job.result or {}).get("exit_code")
    if isinstance(code, int) and code > 0:
        failure.exit_code = code
    return failure


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
                raise job_failed(job)
            return job
        if timeout is not None and time.monotonic() - start > timeout:
            raise JobFailed(f"job {job.id} still {job.state} after {timeout:.0f}s")
        time.sleep(poll)
