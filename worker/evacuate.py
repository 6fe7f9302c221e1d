"""``virtwarden evacuate HOST``: move a host's running domains elsewhere, live.

``submit_evacuate`` is what the CLI, runbooks and the alert path call: it checks the
request, settles each domain's migration policy (targets, timeout; the evacuation's
parallelism is the smallest ``max_parallel`` among them, 2 when no policy says), and
either returns the plan (dry run: nothing is written anywhere) or queues one
``evacuate`` job on the source host's queue. The job plans again when it runs, with the
capacity of that moment.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from catalog import jobs, moves
from catalog.store import Catalog
from policies import DomainFacts, governing, load_policies, parse_metadata
from policies.placement import max_parallel
from tasks.evacuate import DEFAULT_TIMEOUT, EvacuateRequest
from virtwarden.config import Config
from virtwarden.errors import EXIT_FAILED, EXIT_OK, PolicyError, UsageError
from worker.output import emit_json, load_config, table

MiB = 1024 * 1024


def submit_evacuate(cfg: Config, cat: Catalog, host: str, *, to: tuple[str, ...] | list[str] = (),
                    dry_run: bool = False, requested_by: str | None = None,
                    dedup_key: str | None = None) -> jobs.JobView | dict:
    """Queue an evacuation of ``host`` (a JobView), or with ``dry_run`` return its plan
    (a dict, see ``policies.placement.Plan.to_json``) and change nothing."""
    from tasks import evacuate
    from worker import celery_app, submit

    req = build_request(cfg, host, tuple(to))
    if dry_run:
        return {"dry_run": True, "max_parallel": req.max_parallel, **evacuate.plan(req).to_json()}
    celery_app.configure(cfg)
    celery_app.check_broker(cfg)
    return submit.enqueue(cfg, cat, "evacuate", None, host, asdict(req), requested_by, dedup_key=dedup_key)


def build_request(cfg: Config, host: str, to: tuple[str, ...] = ()) -> EvacuateRequest:
    """The job's request: every configured host, and the migration settings of each
    domain on ``host`` from the policy that governs it."""
    from hypervisor import connect

    cfg.host(host)  # UnknownHost with the configured names
    for name in to:
        cfg.host(name)
    if host in to:
        raise UsageError(f"cannot evacuate host {host} onto itself: leave it out of --to")
    policies = load_policies(cfg)
    with connect(host, cfg.host(host).uri) as hv:
        found = hv.domains()
    settings: dict[str, dict] = {}
    limits = []
    for info in found:
        try:
            chosen = governing(policies, DomainFacts(info.name, host, parse_metadata(info.xml)), "migration")
        except PolicyError as e:
            settings[info.name] = {"refused": f"its migration policies conflict: {e}"}
            continue
        if chosen is None or chosen.spec.migration is None:
            continue
        m = chosen.spec.migration
        settings[info.name] = {"policy": chosen.name, "targets": list(m.targets) if m.targets else None,
                               "timeout": m.timeout}
        limits.append(m.max_parallel)
    hosts = {name: {"uri": h.uri, "group": h.group, "shared_storage": h.shared_storage,
                    "memory_reserve_mib": h.memory_reserve_mib,
                    "migration_bandwidth_mib": h.migration_bandwidth_mib} for name, h in cfg.hosts.items()}
    return EvacuateRequest(host=host, hosts=hosts, to=list(to), max_parallel=max_parallel(limits),
                           domains=settings, timeout=DEFAULT_TIMEOUT)


# --- the command --------------------------------------------------------------------------------
def cli(args: argparse.Namespace) -> int:
    from worker.commands import follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    if args.dry_run:
        found = submit_evacuate(cfg, cat, args.host, to=args.to, dry_run=True)
        assert isinstance(found, dict)
        if args.json:
            emit_json(found)
        else:
            print(_plan_text(found))
        return EXIT_OK
    job = submit_evacuate(cfg, cat, args.host, to=args.to, requested_by="cli")
    assert isinstance(job, jobs.JobView)
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
