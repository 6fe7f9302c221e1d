"""``virtwarden verify [DOMAIN] [--storage NAME] [--sample PERCENT] [--dry-run] [--wait] [--json]``.

Re-reads stored restore points and checks them against the catalog (tasks/verify.py);
the request is planned by virtwarden/submit/verify.py, as for the ``verify`` step of
runbooks (``verify-repository``) and the scheduler. With ``--wait`` the command prints
the report and exits 1 when something was found (what was found is then also in the
failed job's result: ``virtwarden job ID``). ``--dry-run`` says what would be read, from
the catalog alone, and creates no job.
"""
from __future__ import annotations

import argparse
import sys

from virtwarden.catalog import jobs
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_FAILED, EXIT_OK


def percent(text: str) -> int:
    """An argparse type: a whole percentage, 1 to 100."""
    try:
        value = int(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percentage (1 to 100)") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 100")
    return value



def cli(args: argparse.Namespace) -> int:
    from virtwarden import submit
    from virtwarden.cli.commands import _configure_celery, follow, queued

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    if args.dry_run:
        plan = submit.plan(cfg, cat, "verify", args.domain, storage=args.storage, sample_percent=args.sample).preview
        if args.json:
            emit_json({"dry_run": True, **plan})
        else:
            _print_plan(plan)
        return EXIT_OK
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "verify", args.domain, storage=args.storage, sample_percent=args.sample,
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
