"""Verifications: which stored points a verify job re-reads (tasks/verify.py), checked
against the catalog before the job exists."""
from __future__ import annotations

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import PolicyError, RestorePointNotFound
from virtwarden.submit import Planned


def params(domain: str | None, storage: str | None, sample_percent: int = 100, policy: str | None = None) -> dict:
    """The verify job's parameters (tasks.verify.VerifyRequest) as JSON data."""
    return {"domain": domain, "storage": storage, "sample_percent": int(sample_percent), "policy": policy}


def plan_verify(cfg: Config, cat: Catalog, domain: str | None, storage: str | None,
                sample_percent: int = 100) -> dict:
    """What a verification would read, from the catalog; changes nothing. Unknown
    storage names and a domain without complete points are errors now."""
    if storage:
        cfg.storage_target(storage)  # an unknown name is an error now, with suggestions
    domains = [domain] if domain else points.domains_with_points(cat, (points.COMPLETE,))
    found = [p for d in domains for p in points.for_domain(cat, d, storage=storage, statuses=(points.COMPLETE,))]
    if domain and not found:
        raise RestorePointNotFound(f"domain {domain!r} has no complete restore point"
                                   + (f" on storage {storage!r}" if storage else "") + " to verify")
    artifacts = sum(len(p.artifacts) for p in found)
    return {"domains": domains, "points": len(found), "artifacts": artifacts,
            "bytes_to_read": sum(a.size_bytes for p in found for a in p.artifacts), "sample_percent": sample_percent,
            "artifacts_to_read_at_least": -(-artifacts * sample_percent // 100),
            "never_verified": sum(1 for p in found if p.verified_at is None),
            "manifests_without_checksum": sum(1 for p in found if not p.manifest_sha256)}


def plan_verify_job(cfg: Config, cat: Catalog, domain: str | None, *, storage: str | None = None,
                    sample_percent: int | None = None, policy: str | None = None, host: str | None = None,
                    known_on_host: bool = False) -> Planned:
    """A verification of ``domain`` (None: every domain with points). With ``policy``
    (the scheduler), its ``spec.verify`` settles the storage and the sample, and a domain
    without points yet is not an error: there is nothing to read. Otherwise the request
    is checked (``plan_verify``), which is also what a dry run shows. The job runs on the
    host of the domain's newest point (the first configured host otherwise): it reads
    storage only."""
    preview: dict = {}
    if policy is not None:
        from virtwarden.policies import load_policies

        found = next((p for p in load_policies(cfg) if p.name == policy), None)
        section = found.spec.verify if found else None
        if section is None:
            raise PolicyError(f"policy {policy!r} has no spec.verify section (any more)")
        storage = storage or section.target
        sample_percent = sample_percent or section.sample_percent
        if storage:
            cfg.storage_target(storage)
    else:
        sample_percent = sample_percent or 100
        preview = plan_verify(cfg, cat, domain, storage, sample_percent)
    return Planned("verify", domain, host_for(cfg, cat, domain), params(domain, storage, sample_percent, policy),
                   preview)


def host_for(cfg: Config, cat: Catalog, domain: str | None) -> str:
    """The configured host that made the domain's latest point (the first host when none
    did, or none is configured any more): where a job reading its points runs."""
    found = points.for_domain(cat, domain) if domain else []
    hosts = [p.host for p in reversed(found) if p.host in cfg.hosts]
    return hosts[0] if hosts else next(iter(cfg.hosts))
