"""Backups and snapshots: settled from the policy that governs the domain (or the one
named) on the host that runs it, as the domain is now."""
from __future__ import annotations

from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.hypervisor.locate import find_host
from virtwarden.policies import parse_metadata, resolve_backup, resolve_snapshots
from virtwarden.submit import Planned


def _where(cfg: Config, domain: str, host: str | None, policy: str | None,
           known_on_host: bool) -> tuple[str, dict[str, str]]:
    """The host and the domain's virtwarden metadata (for selecting its policy). A
    caller that has just seen the domain on ``host`` and names the policy (the
    scheduler, the listener) need not have libvirt asked again."""
    if known_on_host and host and policy:
        return host, {}
    found, info = find_host(cfg, domain, host)
    return found, parse_metadata(info.xml)


def plan_backup(cfg: Config, cat: Catalog, domain: str | None, *, policy: str | None = None,
                target: str | None = None, full: bool = False, host: str | None = None,
                known_on_host: bool = False) -> Planned:
    assert domain is not None
    host, metadata = _where(cfg, domain, host, policy, known_on_host)
    settings = resolve_backup(cfg, domain, policy=policy, target=target, host=host, metadata=metadata)
    cfg.storage_target(settings.target)  # unknown storage: fail before anything is written
    params = settings.job_params(domain, full=full)
    return Planned("backup", domain, host, params, {"host": host, **params})


def plan_snapshot(cfg: Config, cat: Catalog, domain: str | None, *, policy: str | None = None,
                  host: str | None = None, known_on_host: bool = False) -> Planned:
    assert domain is not None
    host, metadata = _where(cfg, domain, host, policy, known_on_host)
    params = resolve_snapshots(cfg, domain, policy=policy, host=host, metadata=metadata).job_params(domain)
    return Planned("snapshot", domain, host, params, {"host": host, **params})
