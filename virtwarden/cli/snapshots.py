"""``virtwarden snapshot DOMAIN`` and ``virtwarden snapshots DOMAIN``. A snapshot's
settings (type, quiesce, retention) are settled by virtwarden/submit/backup.py from the
policy that governs the snapshot job for the domain (or the one named), like a backup's.
"""
from __future__ import annotations

import argparse

from virtwarden.catalog import reader
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_OK


def cli(args: argparse.Namespace) -> int:
    from virtwarden import submit
    from virtwarden.catalog.store import Catalog
    from virtwarden.cli.commands import _after_submit, _configure_celery

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "snapshot", args.domain, policy=args.policy, host=args.host, requested_by="cli")
    return _after_submit(args, cat, job)


def list_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = reader.domain_snapshots(cfg.catalog_url, args.domain)
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
