"""``virtwarden verify [DOMAIN] [--storage NAME] [--sample PERCENT] [--dry-run] [--wait] [--json]``.

Re-reads stored restore points and checks them against the catalog (tasks/verify.py).
The same ``submit_verify`` serves the CLI, the ``verify`` step of runbooks
(``verify-repository``) and, with a policy's settings, the scheduler. With ``--wait``
the command prints the report and exits 1 when something was found (what was found is
then also in the failed job's result: ``virtwarden job ID``). ``--dry-run`` says what
would be read, from the catalog alone, and creates no job.
"""
from __future__ import annotations

import argparse
import sys

from catalog import jobs, points
from catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.config import Config
from virtwarden.errors import EXIT_FAILED, EXIT_OK, PolicyError, RestorePointNotFound


def percent(text: str) -> int:
    """An argparse type: a whole percentage, 1 to 100."""
    try:
        value = int(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percentage (1 to 100)") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 100")
    return value


def params(domain: str | None, storage: str | None, sample_percent: int = 100, policy: str | None = None) -> dict:
    """The verify job's parameters (tasks.verify.VerifyRequest) as JSON data."""
    return {"domain": domain, "storage": storage, "sample_percent": int(sample_percent), "policy": policy}


def scheduled_params(cfg: Config, domain: str, policy: str) -> dict:
    """A scheduled verification's parameters, from its policy's ``spec.verify`` now."""
    from policies import load_policies

    found = next((p for p in load_policies(cfg) if p.name == policy), None)
    section = found.spec.verify if found else None
    if section is None:
        raise PolicyError(f"policy {policy!r} has no spec.verify section (any more)")
    if section.target:
        cfg.storage_target(section.target)
    return params(domain, section.target, section.sample_percent, policy)


def plan_verify(cfg: Config, cat: Catalog, domain: str | None, storage: str | None,
                sample_percent: int = 100) -> dict:
    """What a verification would read, from the catalog; changes nothing. Unknown
    storage names and a domain without complete points are errors now."""
    if storage:
        cfg.storage_target(storage)  # an unknown name is an error now, with suggestions
    domains = [domain] if domain else points.domains_with_points(cat, (points.COMPLETE,))
    found = [p for d in domains for p in points.for_domain(cat, d, storage=storage, statuses=(points.COMPLETE,))]
    if domain and not found:
        raise RestorePointNotFound(f"domain {domain!r} has no complete restore point"
                                   + (f" on storage {storage!r}" if storage else "") + " to verify")
    artifacts = sum(len(p.artifacts) for p in found)
    return {"domains": domains, "points": len(found), "artifacts": artifacts,
            "bytes_to_read": sum(a.size_bytes for p in found for a in p.artifacts), "sample_percent": sample_percent,
            "artifacts_to_read_at_least": -(-artifacts * sample_percent // 100),
            "never_verified": sum(1 for p in found if p.verified_at is None),
            "manifests_without_checksum": sum(1 for p in found if not p.manifest_sha256)}


def submit_verify(cfg: Config, cat: Catalog, *, domain: str | None = None, storage: str | None = None,
                  sample_percent: int = 100, requested_by: str | None = None,
                  dedup_key: str | None = None) -> jobs.JobView:
    """Check the request (``plan_verify``), then queue the job on the host of the
    domain's newest point (the first configured host otherwise): it reads storage only."""
    from virtwarden.submit import enqueue
    from worker import celery_app

    plan_verify(cfg, cat, domain, storage, sample_percent)
    celery_app.check_broker(cfg)
    return enqueue(cfg, cat, "verify", domain, host_for(cfg, cat, domain), params(domain, storage, sample_percent),
                   requested_by, dedup_key=dedup_key)


def host_for(cfg: Config, cat: Catalog, domain: str | None) -> str:
    """The configured host that made the domain's latest point (the first host when none
    did, or none is configured any more): where a job reading its points runs."""
    found = points.for_domain(cat, domain) if domain else []
    hosts = [p.host for p in reversed(found) if p.host in cfg.hosts]
    return hosts[0] if hosts else next(iter(cfg.hosts))


def cli(args: argparse.Namespace) -> int:
    from virtwarden.cli.commands import _configure_celery, follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    if args.dry_run:
        plan = plan_verify(cfg, cat, args.domain, args.storage, args.sample)
        if args.json:
            emit_json({"dry_run": True, **plan})
        else:
            _print_plan(plan)
        return EXIT_OK
    _configure_celery(cfg)
    job = submit_verify(cfg, cat, domain=args.domain, storage=args.storage, sample_percent=args.sample,
                        requested_by="cli")
    if not args.wait:
        return queued(args, job, f"verification of {args.domain or 'every domain'}")
    done, failure = follow(args, cat, job)
    if failure is not None and not done.finished:
        raise failure  # the wait gave up; the job goes on
    if args.json:
        emit_json(done.to_json())
    else:
        _print_report(done)
    return EXIT_OK if done.state == jobs.SUCCEEDED else EXIT_FAILED


def _print_plan(plan: dict) -> None:
    print("dry run: nothing was read and no job was created")
    print(f"  {plan['points']} complete point(s) of {len(plan['domains'])} domain(s): {plan['artifacts']} "
          f"artifact(s), {plan['bytes_to_read']} bytes; {plan['never_verified']} never verified")
    print(f"  every manifest is checked; the artifacts of at least {plan['artifacts_to_read_at_least']} are "
          f"re-read ({plan['sample_percent']}% sample, least recently verified points first)")
    if plan["manifests_without_checksum"]:
        print(f"  {plan['manifests_without_checksum']} point(s) were made before manifests were checksummed: "
              "their manifests are compared with the catalog only")


def _print_report(job: jobs.JobView) -> None:
    result = job.result or {}
    print(f"job {job.id} {job.state}: {result.get('summary') or job.error}")
    rows = [[f["point"], f["domain"], "yes" if f["damaged"] else "no", str(len(f["damaged_with_it"])), f["key"],
             f["problem"]] for f in result.get("problems", [])]
    if rows:
        print(table(rows, ["POINT", "DOMAIN", "DAMAGED", "BUILT ON IT", "KEY", "PROBLEM"]))
    if job.state != jobs.SUCCEEDED:
        print(f"virtwarden: verification failed: {job.error}", file=sys.stderr)
