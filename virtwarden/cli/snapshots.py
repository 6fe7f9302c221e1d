"""``virtwarden snapshot DOMAIN`` and ``virtwarden snapshots DOMAIN``.

A snapshot's settings (type, quiesce, retention) are resolved here from the policy that
governs the snapshot job for the domain (or the one named), like a backup's; the
scheduler and the event listener come through ``submit_snapshot`` too.
"""
from __future__ import annotations

import argparse

from catalog import jobs, snapshots
from catalog.store import Catalog
from hypervisor.locate import find_host
from policies import parse_metadata, resolve_snapshots
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.config import Config
from virtwarden.errors import EXIT_OK


def submit_snapshot(cfg: Config, cat: Catalog, domain: str, *, policy: str | None = None, host: str | None = None,
                    requested_by: str | None = None, dedup_key: str | None = None) -> jobs.JobView:
    from virtwarden import submit
    from worker import celery_app

    host, info = find_host(cfg, domain, host)
    settings = resolve_snapshots(cfg, domain, policy=policy, host=host, metadata=parse_metadata(info.xml))
    celery_app.check_broker(cfg)
    return submit.enqueue(cfg, cat, "snapshot", domain, host, settings.job_params(domain), requested_by,
                          dedup_key=dedup_key)


def cli(args: argparse.Namespace) -> int:
    from virtwarden.cli.commands import _after_submit, _configure_celery

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    _configure_celery(cfg)
    job = submit_snapshot(cfg, cat, args.domain, policy=args.policy, host=args.host, requested_by="cli")
    return _after_submit(args, cat, job)


def list_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = snapshots.for_domain(Catalog(cfg.catalog_url), args.domain)
    if args.json:
        emit_json([s.to_json() for s in found])
        return EXIT_OK
    if not found:
        print(f"no snapshots taken by virtwarden for {args.domain}")
        return EXIT_OK
    rows = [[s.name, s.policy or "-", s.kind, s.consistency or "-", s.state, s.host,
             s.created_at.strftime("%Y-%m-%d %H:%M:%S")] for s in found]
    print(table(rows, ["NAME", "POLICY", "TYPE", "CONSISTENCY", "STATE", "HOST", "CREATED (UTC)"]))
    return EXIT_OK
