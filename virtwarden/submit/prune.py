"""Pruning: the retention for each domain is resolved here, where the configuration and
the policy directory are, and travels in the job's parameters (the worker makes no
policy decisions). Which policy governs a domain is decided as for a backup
(policies.select.governing), over what the catalog knows: the domain's name, the host
of its newest restore point and the virtwarden ``<metadata>`` in that point's manifest
(the domain as it was at its last backup; read only when some policy selects by
metadata). A policy named with a domain applies its retention to it whatever its
selector says (the operator asked); without a domain, to the domains the policy
selects. A domain no policy governs keeps every point.
"""
from __future__ import annotations

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import PolicyError, RestorePointNotFound, VirtwardenError
from virtwarden.policies import load_policies
from virtwarden.policies.model import Policy
from virtwarden.policies.select import by_name, governing, selects
from virtwarden.submit import Planned, catalog_facts
from virtwarden.submit.verify import host_for
from virtwarden.tasks.prune import DomainRules


def plan_prune(cfg: Config, cat: Catalog, domain: str | None, *, policy: str | None = None,
               dry_run: bool = False) -> Planned:
    """A prune job carrying the resolved retention rules (see ``resolve``; the domains
    that cannot be pruned now are in the preview's ``skipped``). It runs on the host of
    the domain's newest point, else on the first configured host: pruning touches
    storage only, never a hypervisor."""
    rules, skipped = resolve(cfg, cat, domain, policy)
    params = {"domain": domain, "policy": policy, "dry_run": dry_run,
              "rules": {name: r.to_json() for name, r in rules.items()}}
    return Planned("prune", domain, host_for(cfg, cat, domain), params, {"skipped": skipped, **params})


def resolve(cfg: Config, cat: Catalog, domain: str | None, policy: str | None
            ) -> tuple[dict[str, DomainRules], dict[str, str]]:
    """The retention of ``domain`` (or of every domain with restore points), and the
    domains that cannot be pruned now with the reason. For one named domain a problem
    is an error (PolicyError, NotFound, a storage error) instead."""
    found = load_policies(cfg)
    named = by_name(found, policy) if policy else None
    if domain and not points.for_domain(cat, domain):
        raise RestorePointNotFound(f"domain {domain!r} has no restore points in the catalog")
    rules: dict[str, DomainRules] = {}
    skipped: dict[str, str] = {}
    for name in [domain] if domain else points.domains_with_points(cat):
        try:
            chosen = _for_domain(cfg, cat, found, name, named, explicit=domain is not None)
        except VirtwardenError as e:
            if domain:
                raise
            skipped[name] = str(e)
            continue
        if chosen is not None:
            rules[name] = chosen
    return rules, skipped


def _for_domain(cfg: Config, cat: Catalog, found: list[Policy], domain: str, named: Policy | None,
                explicit: bool) -> DomainRules | None:
    if named is not None and explicit:
        return _rules(domain, named, f"policy {named.name!r}, named with --policy")
    facts = catalog_facts(cfg, cat, domain, found)
    if named is not None:
        return _rules(domain, named, f"policy {named.name!r}, named with --policy") if selects(named, facts) else None
    chosen = governing(found, facts)
    if chosen is None:
        return DomainRules(domain, None, None, "no policy governs it: every point is kept")
    return _rules(domain, chosen, f"policy {chosen.name!r} governs it")


def _rules(domain: str, chosen: Policy, source: str) -> DomainRules:
    backup = chosen.spec.backup
    if backup is None:
        raise PolicyError(f"{chosen.source_text}: policy {chosen.name!r} has no spec.backup section, so no"
                          " retention for restore points")
    if backup.retention is None:
        source += " and has no retention: every point is kept"
    return DomainRules(domain, chosen.name, backup.retention, source)
