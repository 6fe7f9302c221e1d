"""Restores: to a directory, as a new domain or in place; planned from the catalog, the
chain's manifests and (for a new domain or in place) the host's libvirt."""
from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import DomainNotFound
from virtwarden.hypervisor.locate import find_host
from virtwarden.submit import Planned

if TYPE_CHECKING:
    from virtwarden.tasks.restore_plan import RestorePlan

RESTORE_KINDS = {"to-dir": "restore", "as-domain": "restore-as-domain", "in-place": "restore-in-place"}


def plan_restore_job(cfg: Config, cat: Catalog, domain: str | None, *, point: str = "latest",
                     at: str | datetime | None = None, to_dir: str | None = None, as_domain: str | None = None,
                     in_place: bool = False, discard_old: bool = False, start: bool = False,
                     host: str | None = None, disk_dir: str | None = None, shutdown_timeout: float | None = None,
                     confined: bool = True) -> Planned:
    """Check and plan a restore (see ``plan_restore``) as the job it becomes. Every
    refusal (unknown point, a name or file in the way, a disk that does not fit, a
    destination outside restore.allowed_dirs) is raised here, before any job exists.

    ``confined`` (the API, runbooks): to_dir and disk_dir must be under
    restore.allowed_dirs, and the job says so, so that the worker checks again right
    before it writes. Only a restore that root starts from the command line passes
    False (``restore_confined``)."""
    assert domain is not None
    if shutdown_timeout is not None and not in_place:
        from virtwarden.tasks.restore import InvalidRestoreRequest

        raise InvalidRestoreRequest("--shutdown-timeout goes with --in-place only")
    plan = plan_restore(cfg, cat, domain, point=point, at=at, to_dir=to_dir, as_domain=as_domain,
                        in_place=in_place, discard_old=discard_old, start=start, host=host, disk_dir=disk_dir,
                        confined=confined)
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
    return Planned(RESTORE_KINDS[plan.mode], domain, plan.host, params, plan.to_json())


def plan_restore(cfg: Config, cat: Catalog, domain: str, *, point: str = "latest",
                 at: str | datetime | None = None, to_dir: str | None = None, as_domain: str | None = None,
                 in_place: bool = False, discard_old: bool = False, start: bool = False,
                 host: str | None = None, disk_dir: str | None = None, confined: bool = True) -> RestorePlan:
    """What the restore would do (``tasks.restore_plan``), changing nothing: the dry run.
    Reads the catalog, the chain's manifests and, for a new domain or in place, asks
    the host's libvirt; creates no job. A ``confined`` request's to_dir and disk_dir
    outside restore.allowed_dirs are refused first, before anything is looked up."""
    from virtwarden.storage_backends import open_backend
    from virtwarden.storage_backends.format2.access import repositories
    from virtwarden.tasks.restore import describe_selection, load_chain, resolve_point
    from virtwarden.tasks.restore_plan import Destination, check_paths, confine_destination
    from virtwarden.tasks.restore_plan import plan_restore as make_plan

    dest = Destination.from_options(to_dir=to_dir, as_domain=as_domain, in_place=in_place, disk_dir=disk_dir,
                                    start=start, discard_old=discard_old)
    if confined:
        confine_destination(dest, cfg.restore_roots)
    resolved = resolve_point(cat, domain, point, at=at)
    live = None
    if dest.mode == "in-place":
        from virtwarden.hypervisor import connect
        from virtwarden.tasks.restore_domain import inspect_host

        try:
            host, _ = find_host(cfg, domain, host)
        except DomainNotFound as e:
            raise DomainNotFound(f"{e}: there is nothing to restore in place; to bring it back, restore it "
                                 f"--as-domain {domain}") from e
        with connect(host, cfg.host(host).uri) as hv:
            live = inspect_host(cat, hv, domain)
    else:
        host = host or (resolved.host if resolved.host in cfg.hosts else next(iter(cfg.hosts)))
        cfg.host(host)  # an unknown host is an error now
    settings = cfg.storage_target(resolved.storage)
    backend = open_backend(resolved.storage, settings)
    try:
        chain = load_chain(cat, backend, resolved, repositories(cfg))
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
    from virtwarden.hypervisor import connect, domains
    from virtwarden.tasks.restore import RestoreRefused

    with connect(host, cfg.host(host).uri) as hv:
        if domains.exists(hv, name):
            raise RestoreRefused(f"host {host} already has a domain named {name!r}; choose another name "
                                 "(nothing was changed)")


