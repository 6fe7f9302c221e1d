"""``virtwarden evacuate HOST``: move a host's running domains elsewhere, live. The
request is planned by virtwarden/submit/evacuate.py (as for runbooks and alerts);
``--dry-run`` prints that plan and writes nothing anywhere, otherwise one ``evacuate``
job is queued on the source host's queue. The job plans again when it runs, with the
capacity of that moment.
"""
from __future__ import annotations

import argparse

from virtwarden.catalog import jobs, moves
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_FAILED, EXIT_OK

MiB = 1024 * 1024



# --- the command --------------------------------------------------------------------------------
def cli(args: argparse.Namespace) -> int:
    from virtwarden import submit
    from virtwarden.cli.commands import _configure_celery, follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    if args.dry_run:
        found = submit.plan(cfg, cat, "evacuate", args.host, to=args.to).preview
        if args.json:
            emit_json(found)
        else:
            print(_plan_text(found))
        return EXIT_OK
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "evacuate", args.host, to=args.to, requested_by="cli")
    if not args.wait:
        return queued(args, job, f"evacuate host {args.host}")
    done, error = follow(args, cat, job)
    rows = moves.for_job(cat, job.id)
    if args.json:
        emit_json({**done.to_json(), "migrations": [r.to_json() for r in rows]})
    else:
        print(_rows_text(rows) if rows else f"nothing to move off {args.host}")
        print(f"job {done.id} {done.state}: {(done.result or {}).get('summary') or done.error or ''}")
    if error is not None and not done.finished:  # gave up waiting
        raise error
    return EXIT_OK if done.state == jobs.SUCCEEDED else EXIT_FAILED


def _plan_text(plan: dict) -> str:
    rows = [[m["domain"], f"{m['memory_mib']} MiB", str(m["vcpus"]), f"-> {m['to']}", m["policy"] or "-"]
            for m in plan["moves"]]
    rows += [[x["domain"], "", "", "stays", x["reason"]] for x in plan["left"]]
    head = (f"evacuation plan for {plan['host']} (dry run, nothing changed; at most {plan['max_parallel']} at a"
            f" time; targets: {', '.join(plan['targets']) or 'none'})")
    if not rows:
        return f"{head}\nno domains on {plan['host']}"
    return head + "\n" + table(rows, ["DOMAIN", "MEMORY", "VCPUS", "ACTION", "POLICY / REASON"])


def _rows_text(rows: list[moves.MigrationView]) -> str:
    out = [[r.domain, r.to_host or "-", r.outcome, f"{r.downtime_ms} ms" if r.downtime_ms is not None else "-",
            (r.reason or "")[:100]] for r in rows]
    return table(out, ["DOMAIN", "TO", "OUTCOME", "DOWNTIME", "REASON"])
