"""``virtwarden prune [DOMAIN] [--policy NAME] [--dry-run] [--wait] [--json]``.

The retention for each domain is resolved here, where the configuration and the policy
directory are, and travels in the job's parameters (the worker makes no policy
decisions). Which policy governs a domain is decided as for a backup
(policies.select.governing), over what the catalog knows: the domain's name, the host
of its newest restore point and the virtwarden ``<metadata>`` in that point's manifest
(the domain as it was at its last backup; read only when some policy selects by
metadata). ``--policy NAME`` with a DOMAIN applies that policy's retention to it
whatever its selector says (the operator asked); without a DOMAIN, to the domains the
policy selects. A domain no policy governs keeps every point.

``--dry-run`` computes the plan in this process from the catalog and prints it; it
changes nothing and needs no worker.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from catalog import jobs, points
from catalog.clock import database_now
from catalog.store import Catalog
from policies import load_policies, parse_metadata
from policies.model import Policy
from policies.select import DomainFacts, by_name, governing, selects
from storage_backends import open_backend
from storage_backends.repository import Repository
from tasks.prune import DomainRules, dry_run_domain, summarize
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.cli.verify import host_for
from virtwarden.config import Config
from virtwarden.errors import EXIT_OK, PolicyError, RestorePointNotFound, VirtwardenError


def cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    rules, skipped = resolve(cfg, cat, args.domain, args.policy)
    for domain, why in sorted(skipped.items()):
        print(f"virtwarden: prune: skipping {domain}: {why}", file=sys.stderr)
    if args.dry_run:
        now = database_now(cat)
        result = summarize([dry_run_domain(cat, r, now) for _, r in sorted(rules.items())], dry_run=True)
        if args.json:
            emit_json(result)
        else:
            print_plan(result)
        return EXIT_OK
    from virtwarden.cli.commands import _after_submit, _configure_celery

    _configure_celery(cfg)
    job = submit(cfg, cat, rules, domain=args.domain, policy=args.policy, requested_by="cli")
    return _after_submit(args, cat, job)


def submit(cfg: Config, cat: Catalog, rules: dict[str, DomainRules], *, domain: str | None = None,
           policy: str | None = None, dry_run: bool = False, requested_by: str | None = None) -> jobs.JobView:
    """Queue a prune job carrying the resolved ``rules`` (see ``resolve``). It runs on
    the host of the domain's newest point, else on the first configured host: pruning
    touches storage only, never a hypervisor."""
    from virtwarden.submit import enqueue
    from worker import celery_app

    celery_app.check_broker(cfg)
    params = {"domain": domain, "policy": policy, "dry_run": dry_run,
              "rules": {name: r.to_json() for name, r in rules.items()}}
    return enqueue(cfg, cat, "prune", domain, host_for(cfg, cat, domain), params, requested_by)


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
    facts = _facts(cfg, cat, domain, found)
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


def _facts(cfg: Config, cat: Catalog, domain: str, found: list[Policy]) -> DomainFacts:
    """What selection may know without asking libvirt: name, host and metadata of the
    domain as of its newest complete restore point."""
    usable = points.for_domain(cat, domain, statuses=(points.COMPLETE,))
    if not usable:
        return DomainFacts(domain)
    newest = usable[-1]
    metadata: dict[str, str] = {}
    if any(p.spec.selector.metadata for p in found):
        backend = open_backend(newest.storage, cfg.storage_target(newest.storage))
        try:
            manifest = Repository(backend).read_manifest(newest.manifest_key, newest.manifest_sha256)
        finally:
            backend.close()
        metadata = parse_metadata(manifest["domain"]["xml"])
    return DomainFacts(domain, newest.host, metadata)


def print_plan(result: dict[str, Any]) -> None:
    for report in result["domains"]:
        kept = report["retention"]
        rules = ", ".join(f"{k}={v}" for k, v in kept.items() if v) if kept else "none"
        print(f"{report['domain']}: {report['source']} (retention: {rules})")
        rows = [[r["id"], r["created_at"][:19].replace("T", " "), r["level"], r["chain_id"][:8], r["storage"],
                 r["action"], r["reason"]] for r in report["points"]]
        print(table(rows, ["POINT", "CREATED (UTC)", "LEVEL", "CHAIN", "STORAGE", "ACTION", "REASON"])
              if rows else "  no complete restore points")
        print()
    print(f"{result['summary']} (dry run: nothing was changed)")
