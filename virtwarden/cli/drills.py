"""``virtwarden drill DOMAIN`` and ``virtwarden drills [DOMAIN]``. What a drill runs
with is settled by its planner (virtwarden/submit/drill.py); the drill runs on
``--host``, else on the host that made the point.
"""
from __future__ import annotations

import argparse
import sys

from virtwarden.catalog import reader
from virtwarden.catalog.views import DrillView
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_FAILED, EXIT_OK

# --- commands -------------------------------------------------------------------------------

def cli(args: argparse.Namespace) -> int:
    from virtwarden import submit
    from virtwarden.catalog import drills
    from virtwarden.catalog.store import Catalog
    from virtwarden.cli.commands import _configure_celery, follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "drill", args.domain, point=args.point, policy=args.policy, host=args.host,
                        requested_by="cli")
    if not args.wait:
        return queued(args, job, f"drill of {job.domain} (point {job.params['point']})")
    done, failure = follow(args, cat, job)
    if not done.finished:  # --timeout ran out
        assert failure is not None
        raise failure
    drill = drills.find(cat, job.id)
    if args.json:
        emit_json({**done.to_json(), "drill": drill.to_json() if drill else None})
    elif drill is not None:
        print_drill(drill)
    else:  # it failed before it began (e.g. the point was deleted meanwhile)
        print(f"job {done.id} {done.state}: {done.error or ''}")
    if failure is not None:
        print(f"virtwarden: drill failed: {done.error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def print_drill(d: DrillView) -> None:
    print(f"drill {d.id} of {d.domain}: point {d.point_id} on host {d.host}, throwaway domain {d.throwaway}")
    rows = [[c["name"], "ok" if c["ok"] else "FAILED", c["detail"]] for c in d.checks]
    print(table(rows, ["CHECK", "RESULT", "DETAIL"]) if rows else "no check ran")
    times = f"restore {_secs(d.restore_seconds)}, boot {_secs(d.boot_seconds)}"
    cleaned = "cleaned up" if d.cleaned_up else "NOT cleaned up"
    print(f"{d.state.upper()}: {times}; {cleaned}")
    if d.error and (d.passed or all(c["ok"] for c in d.checks)):  # not said by a failed check
        print(f"error: {d.error}")


def list_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = reader.recent_drills(cfg.catalog_url, domain=args.domain)
    if args.json:
        emit_json([d.to_json() for d in found])
        return EXIT_OK
    if not found:
        print(f"no drills{' of ' + args.domain if args.domain else ''}")
        return EXIT_OK
    rows = [[d.id[:8], d.domain, (d.point_id or "-")[:8], d.host, d.state, _secs(d.restore_seconds),
             _secs(d.boot_seconds), _checks(d), "yes" if d.cleaned_up else "NO",
             d.started_at.strftime("%Y-%m-%d %H:%M:%S") if d.started_at else "-"] for d in found]
    print(table(rows, ["DRILL", "DOMAIN", "POINT", "HOST", "STATE", "RESTORE", "BOOT", "CHECKS", "CLEANED",
                       "STARTED (UTC)"]))
    return EXIT_OK


def _checks(d: DrillView) -> str:
    failed = [c["name"] for c in d.checks if not c["ok"]]
    return f"failed: {', '.join(failed)}" if failed else f"{len(d.checks)} ok"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
