"""``virtwarden catalog rebuild --storage NAME [--dry-run] [--json]``.

Recreates the catalog's restore points from the storage target's published manifests
(tasks/rebuild.py). It runs in this process, not on a worker: it is what an operator
runs when the catalog is gone, before anything else works, and it needs only the
configuration, the storage and a catalog (an empty one is created). Points already in
the catalog are left as they are and reported; manifests that do not parse, or whose
chain is broken, are reported and not imported. Exit status 1 when a manifest was
refused (0 for a dry run, which only reports).
"""
from __future__ import annotations

import argparse
import logging

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_FAILED, EXIT_OK
from virtwarden.storage_backends import open_backend
from virtwarden.storage_backends.format2.access import open_repository
from virtwarden.tasks.rebuild import RebuildPlan, apply, plan_rebuild, read_format2, read_repository, summary

log = logging.getLogger(__name__)


def cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    settings = cfg.storage_target(args.storage)  # UnknownStorage, with the configured names
    cat = Catalog(cfg.catalog_url)
    backend = open_backend(args.storage, settings)
    try:
        if settings.format == 2:
            found, objects = read_format2(open_repository(args.storage, settings, backend=backend, prompt=True))
        else:
            found, objects = read_repository(backend)
    finally:
        backend.close()
    plan = plan_rebuild(args.storage, found, objects, points.on_storage(cat, args.storage))
    imported, raced = (list(plan.imports), []) if args.dry_run else apply(cat, plan)
    for p in imported if not args.dry_run else []:
        log.info("catalog rebuild: imported point %s of %s (chain %s, seq %d)", p.id, p.domain, p.chain_id, p.seq)
    result = _result(plan, imported, raced, args.dry_run)
    if args.json:
        emit_json(result)
    else:
        _print(plan, result)
    return EXIT_FAILED if plan.refused and not args.dry_run else EXIT_OK


def _result(plan: RebuildPlan, imported: list, raced: list, dry_run: bool) -> dict:
    present = [{"id": p.id, "domain": p.domain, "status": p.status} for p in [*plan.present, *raced]]
    return {"storage": plan.storage, "dry_run": dry_run,
            "imported": [p.to_json() | {"domain": p.domain} for p in imported],
            "present": present, "refused": [r.to_json() for r in plan.refused],
            "catalog_only": [{"id": p.id, "domain": p.domain, "manifest_key": p.manifest_key}
                             for p in plan.catalog_only],
            "summary": summary(plan, len(imported), len(present), dry_run)}


def _print(plan: RebuildPlan, result: dict) -> None:
    if result["dry_run"]:
        print("dry run: the catalog was not changed")
    rows = [[p["id"], p["domain"], p["created_at"][:19].replace("T", " "), p["level"], p["chain_id"][:8],
             str(len(p["disks"]))] for p in result["imported"]]
    if rows:
        print(table(rows, ["POINT", "DOMAIN", "CREATED (UTC)", "LEVEL", "CHAIN", "DISKS"]))
    for r in plan.refused:
        print(f"refused {r.key}: {r.problem}")
    for p in plan.catalog_only:
        print(f"in the catalog only: point {p.id} of {p.domain}: no manifest at {p.manifest_key}"
              " (run `virtwarden verify` to take it out of service)")
    print(result["summary"])
