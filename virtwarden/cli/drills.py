"""``virtwarden drill DOMAIN`` and ``virtwarden drills [DOMAIN]``; ``submit_drill`` for
the scheduler, event triggers, runbooks and the API.

A drill's settings are settled here, where the configuration and the policies are, and
travel in the job's parameters (tasks.drill.DrillRequest): the policy named with
``--policy``, else the one that governs drills of the domain (policies.select; a policy
with a backup section and no drill section drills with the defaults), else the
defaults (latest point, 60 s, no marker, no agent check, no network). Selection uses
what the catalog knows, like ``prune``: the name, the host of the newest restore point
and, when some policy selects by metadata, the metadata saved with that point, so a
domain that no longer exists can still be drilled. The point is resolved now (an
unknown id or a domain without points is an error before any job exists); the drill
runs on ``--host``, else on the host that made the point.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from catalog import drills, jobs, points
from catalog.store import Catalog
from policies import load_policies, parse_metadata
from policies.model import Drill, Policy
from policies.select import DomainFacts, by_name, governing
from tasks.drill import DrillRequest, check_request, pick_point
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.config import Config
from virtwarden.errors import EXIT_FAILED, EXIT_OK, PolicyError


def drill_params(cfg: Config, cat: Catalog, domain: str, *, point: str | None = None, policy: str | None = None,
                 host: str | None = None) -> dict[str, Any]:
    """The drill job's parameters (a DrillRequest as JSON data). ``point`` None: the
    policy's ``drill.point``."""
    found = load_policies(cfg)
    chosen = by_name(found, policy) if policy else governing(found, _facts(cfg, cat, domain, host, found), "drill")
    section = _section(chosen)
    storage = section.target or (chosen.spec.backup.target if chosen and chosen.spec.backup else None)
    if storage is not None:
        cfg.storage_target(storage)  # UnknownStorage, with the configured names
    resolved = pick_point(cat, domain, point or section.point, storage)
    req = DrillRequest(domain=domain, policy=chosen.name if chosen else None, point=resolved.id, storage=storage,
                       run_for=float(section.run_for),
                       boot_timeout=float(section.boot_timeout), serial_marker=section.serial_marker,
                       expect_agent=section.expect_agent, network=section.network)
    check_request(req)
    return asdict(req)


def submit_drill(cfg: Config, cat: Catalog, domain: str, *, point: str | None = "latest", policy: str | None = None,
                 host: str | None = None, requested_by: str | None = None,
                 dedup_key: str | None = None, interactive: bool = True) -> jobs.JobView:
    """Queue a drill of ``domain``; ``point`` is an id, ``latest``, ``oldest`` or None
    (the policy's choice). ``interactive``: see ``virtwarden.submit.backup``."""
    from virtwarden.submit import enqueue
    from worker import celery_app

    params = drill_params(cfg, cat, domain, point=point, policy=policy, host=host)
    if host is None:
        made_on = points.get(cat, params["point"]).host
        host = made_on if made_on in cfg.hosts else next(iter(cfg.hosts))
    cfg.host(host)  # UnknownHost
    if interactive:
        celery_app.check_broker(cfg)
    return enqueue(cfg, cat, "drill", domain, host, params, requested_by, dedup_key=dedup_key,
                   interactive=interactive)


def _section(chosen: Policy | None) -> Drill:
    if chosen is None:
        return Drill()
    section = chosen.section("drill")
    if not isinstance(section, Drill):
        raise PolicyError(f"{chosen.source_text}: policy {chosen.name!r} has no spec.drill or spec.backup section:"
                          " it says nothing about drills")
    return section


def _facts(cfg: Config, cat: Catalog, domain: str, host: str | None, found: list[Policy]) -> DomainFacts:
    usable = points.for_domain(cat, domain, statuses=(points.COMPLETE,))
    if not usable:
        return DomainFacts(domain, host)
    newest = usable[-1]
    metadata: dict[str, str] = {}
    if any(p.spec.selector.metadata for p in found):
        from storage_backends import open_backend
        from storage_backends.repository import Repository

        backend = open_backend(newest.storage, cfg.storage_target(newest.storage))
        try:
            manifest = Repository(backend).read_manifest(newest.manifest_key, newest.manifest_sha256)
            metadata = parse_metadata(manifest["domain"]["xml"])
        finally:
            backend.close()
    return DomainFacts(domain, host or newest.host, metadata)


# --- commands -------------------------------------------------------------------------------

def cli(args: argparse.Namespace) -> int:
    from virtwarden.cli.commands import _configure_celery, follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    _configure_celery(cfg)
    job = submit_drill(cfg, cat, args.domain, point=args.point, policy=args.policy, host=args.host,
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


def print_drill(d: drills.DrillView) -> None:
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
    found = drills.recent(Catalog(cfg.catalog_url), domain=args.domain)
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


def _checks(d: drills.DrillView) -> str:
    failed = [c["name"] for c in d.checks if not c["ok"]]
    return f"failed: {', '.join(failed)}" if failed else f"{len(d.checks)} ok"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
