"""``virtwarden prune [DOMAIN] [--policy NAME] [--dry-run] [--wait] [--json]``.

The retention of each domain is resolved by virtwarden/submit/prune.py. ``--dry-run``
computes the plan in this process from the catalog and prints it; it changes nothing
and needs no worker.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from virtwarden.catalog.clock import database_now
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_OK
from virtwarden.tasks.prune import DomainRules, dry_run_domain, summarize


def cli(args: argparse.Namespace) -> int:
    from virtwarden import submit

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    planned = submit.plan(cfg, cat, "prune", args.domain, policy=args.policy)
    for domain, why in sorted(planned.preview["skipped"].items()):
        print(f"virtwarden: prune: skipping {domain}: {why}", file=sys.stderr)
    if args.dry_run:
        now = database_now(cat)
        rules = sorted(planned.params["rules"].items())
        result = summarize([dry_run_domain(cat, DomainRules.from_json(d, r), now) for d, r in rules], dry_run=True)
        if args.json:
            emit_json(result)
        else:
            print_plan(result)
        return EXIT_OK
    from virtwarden.cli.commands import _after_submit, _configure_celery

    _configure_celery(cfg)
    job = submit.submit_planned(cfg, cat, planned, requested_by="cli")
    return _after_submit(args, cat, job)



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
