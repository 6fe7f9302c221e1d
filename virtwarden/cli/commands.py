"""What each CLI command does: parse nothing, print results, return an exit code."""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from virtwarden.catalog import reader
from virtwarden.catalog.views import BEAT_SECONDS, DAMAGED, FAILED, NEW, JobView, PointView
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, JobFailed
from virtwarden.sizes import human_size

if TYPE_CHECKING:  # imported where a handler opens the catalog: SQLAlchemy costs a read-only command 0.2 s
    from virtwarden.catalog.store import Catalog


def policy_validate(args: argparse.Namespace) -> int:
    from virtwarden.policies import check_against_config, validate_paths

    books: list = []
    found, errors = validate_paths(args.paths, books)
    if not errors and args.config:
        errors = check_against_config(found, load_config(args))
    if args.json:
        emit_json({"ok": not errors, "policies": [p.name for p in found], "runbooks": [b.name for b in books],
                   "errors": [_located(line) for line in errors]})
        return EXIT_FAILED if errors else EXIT_OK
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        print(f"{len(errors)} error(s) in {len(args.paths)} path(s)", file=sys.stderr)
        return EXIT_FAILED
    runbooks = f" and {len(books)} runbook{'' if len(books) == 1 else 's'}" if books else ""
    print(f"ok: {len(found)} polic{'y' if len(found) == 1 else 'ies'}{runbooks} valid")
    return EXIT_OK


def _located(error: str) -> dict:
    """An error line ``FILE:LINE: FIELD: MESSAGE`` as data (the whole line as ``text``
    either way)."""
    m = re.match(r"^(?P<file>[^:]+):(?P<line>\d+): (?:(?P<field>[\w.\[\]-]+): )?(?P<message>.*)$", error)
    if not m:
        return {"text": error}
    return {"text": error, "file": m["file"], "line": int(m["line"]), "field": m["field"], "message": m["message"]}


def policy_list(args: argparse.Namespace) -> int:
    from virtwarden.policies import load_dir

    cfg = load_config(args)
    found = load_dir(cfg.policies_path, missing_ok=True)
    if args.json:
        emit_json([p.summary() for p in found])
        return EXIT_OK
    rows = [[p.name, ",".join(p.spec.selector.domains), p.spec.backup.target if p.spec.backup else "-",
             p.spec.backup.schedule or "-" if p.spec.backup else "-", p.source_text] for p in found]
    print(table(rows, ["NAME", "DOMAINS", "TARGET", "SCHEDULE", "FILE"]) if rows
          else f"no policies in {cfg.policies_path}")
    return EXIT_OK


def backup(args: argparse.Namespace) -> int:
    from virtwarden import submit
    from virtwarden.catalog.store import Catalog

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "backup", args.domain, policy=args.policy, target=args.target, full=args.full,
                        host=args.host, requested_by="cli")
    return _after_submit(args, cat, job)


def restore(args: argparse.Namespace) -> int:
    """``restore DOMAIN``: into a directory, as a new domain or in place; ``--dry-run``
    prints the plan and creates nothing."""
    import os

    from virtwarden import submit
    from virtwarden.catalog.store import Catalog
    from virtwarden.submit.restore import plan_restore, restore_confined

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    where = {"to_dir": os.path.abspath(args.to_dir) if args.to_dir else None,  # the worker has another cwd
             "as_domain": args.as_domain, "in_place": args.in_place, "discard_old": args.discard_old,
             "start": args.start, "host": args.host,
             "disk_dir": os.path.abspath(args.disk_dir) if getattr(args, "disk_dir", None) else None}
    if args.dry_run:
        plan = plan_restore(cfg, cat, args.domain, point=args.point, at=args.at, confined=restore_confined(),
                            **where)
        if args.json:
            emit_json({"dry_run": True, **plan.to_json()})
        else:
            print("\n".join(["dry run: nothing was changed and no job was created", *plan.describe()]))
        return EXIT_OK
    _configure_celery(cfg)
    job = submit.submit(cfg, cat, "restore", args.domain, point=args.point, at=args.at, requested_by="cli",
                        shutdown_timeout=getattr(args, "shutdown_timeout", None), confined=restore_confined(),
                        **where)
    return _after_submit(args, cat, job)


def _configure_celery(cfg) -> None:
    from virtwarden.worker import celery_app

    celery_app.configure(cfg)


def queued(args: argparse.Namespace, job: JobView, what: str | None = None) -> int:
    """Without --wait: say what was queued (or print the job as JSON)."""
    if args.json:
        emit_json(job.to_json())
    else:
        print(f"job {job.id} queued: {what or f'{job.kind} of {job.domain}'} on host {job.host}")
    return EXIT_OK


def follow(args: argparse.Namespace, cat: Catalog, job: JobView) -> tuple[JobView, JobFailed | None]:
    """With --wait: follow the job (a progress line on a terminal) until it finished or
    --timeout ran out. Returns the job as it is then, and the failure if it failed or
    the wait gave up (the job is then not finished)."""
    from virtwarden import submit
    from virtwarden.catalog import jobs

    progress = _Progress() if sys.stderr.isatty() and not args.json else None
    try:
        return submit.wait(cat, job.id, on_progress=progress, timeout=args.timeout), None
    except JobFailed as e:
        return jobs.get(cat, job.id), e  # the job as it is now: failed, or still running
    finally:
        if progress:
            progress.close()


def _after_submit(args: argparse.Namespace, cat: Catalog, job: JobView) -> int:
    if not args.wait:
        return queued(args, job)
    done, failure = follow(args, cat, job)
    if failure is not None:
        raise failure
    if args.json:
        emit_json(done.to_json())
    else:
        print(f"job {done.id} {done.state}: {_summary(done)}")
    return EXIT_OK


def _summary(job: JobView) -> str:
    r = job.result or {}
    if job.kind == "backup":
        return f"{r.get('level')} backup, point {r.get('point_id')}, {r.get('size_bytes', 0)} bytes ({r.get('reason')})"
    if job.kind == "restore":
        return f"point {r.get('point_id')} restored into {r.get('to_dir')}: {', '.join(r.get('disks', []))}"
    if job.kind == "snapshot":
        gone = f"; rotated out: {', '.join(r['deleted'])}" if r.get("deleted") else ""
        return f"{r.get('type')} snapshot {r.get('snapshot')} ({r.get('consistency')}){gone}"
    if job.kind in ("restore-as-domain", "restore-in-place"):
        return _restore_summary(job.kind, r)
    if "summary" in r:  # a job that words its own result (prune)
        return str(r["summary"])
    return str(r)


def _restore_summary(kind: str, r: dict) -> str:
    disks = ", ".join(f"{t} -> {p}" for t, p in (r.get("disks") or {}).items())
    started = "started" if r.get("started") else "not started"
    if kind == "restore-as-domain":
        head = (f"point {r.get('point_id')} restored as domain {r.get('domain')} "
                f"(UUID {r.get('uuid')}, {started}): {disks}")
        return "\n".join([head] + [f"left out of the saved XML: {x}" for x in r.get("left_out_of_xml", [])])
    lines = [f"point {r.get('point_id')} restored in place into {r.get('domain')} ({started}): {disks}"]
    if r.get("set_aside"):
        lines.append(f"the replaced images are kept: {', '.join(r['set_aside'])} (delete them once satisfied)")
    if r.get("discarded"):
        lines.append(f"the replaced images were deleted: {', '.join(r['discarded'])}")
    lines += [f"warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


class _Progress:
    """One line on a terminal, rewritten in place."""

    def __call__(self, job: JobView) -> None:
        text = job.progress_text or job.state
        sys.stderr.write(f"\r\x1b[K[{job.progress * 100:5.1f}%] {job.state}: {text}"[:200])
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def backups(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = reader.domain_points(cfg.catalog_url, args.domain)
    if args.json:
        emit_json([p.to_json() for p in found])
        return EXIT_OK
    if not found:
        print(f"no restore points for {args.domain}")
        return EXIT_OK
    rows = [[p.id, p.created_at.strftime("%Y-%m-%d %H:%M:%S"), p.level, p.chain_id[:8], human_size(p.size_bytes),
             p.storage, p.status, _verified(p)] for p in found]
    print(table(rows, ["ID", "CREATED (UTC)", "LEVEL", "CHAIN", "SIZE", "STORAGE", "STATUS", "VERIFIED (UTC)"]))
    unusable = [p for p in found if p.status in (DAMAGED, FAILED)]
    for p in unusable:  # the whole reason, not cut to a column
        print(f"{p.id} {p.status}: {p.note}")
    return EXIT_OK


def _verified(p: PointView) -> str:
    return p.verified_at.strftime("%Y-%m-%d %H:%M") if p.verified_at else "-"


def jobs_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = reader.recent_jobs(cfg.catalog_url, limit=args.limit, domain=args.domain)
    if args.json:
        emit_json([j.to_json() for j in found])
        return EXIT_OK
    rows = [[j.id, j.kind, j.domain or "-", j.host or "-", j.state, f"{j.progress * 100:.0f}%",
             j.created_at.strftime("%Y-%m-%d %H:%M:%S"), (j.error or j.progress_text or "")[:60]] for j in found]
    print(table(rows, ["ID", "KIND", "DOMAIN", "HOST", "STATE", "DONE", "CREATED (UTC)", "NOTE"]) if rows
          else "no jobs")
    return EXIT_OK


def slots_list(args: argparse.Namespace) -> int:
    """``virtwarden schedule slots``: what the scheduler decided, newest slot first; a
    skipped slot says why (missed, waited in vain for a limit, or its job failed to be
    created), a deferred one what it waits for."""
    from datetime import UTC, datetime, timedelta

    if not args.hours > 0:
        print("virtwarden: error: --hours must be more than 0", file=sys.stderr)
        return EXIT_USAGE
    cfg = load_config(args)
    found = reader.recent_slots(cfg.catalog_url, since=datetime.now(UTC) - timedelta(hours=args.hours),
                                state=args.state, domain=args.domain)
    if args.json:
        emit_json([r.to_json() for r in found])
        return EXIT_OK
    rows = [[r.slot_at.strftime("%Y-%m-%d %H:%M"), r.policy, r.job, r.domain, r.state, r.job_id or "-",
             "" if r.reason == NEW else (r.reason or "")[:80]] for r in found]
    print(table(rows, ["SLOT (UTC)", "POLICY", "JOB", "DOMAIN", "STATE", "JOB ID", "WHY"]) if rows
          else f"no slots in the last {args.hours:g} hours")
    return EXIT_OK


def alerts_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = reader.recent_alerts(cfg.catalog_url, limit=args.limit, host=args.host)
    if args.json:
        emit_json([a.to_json() for a in found])
        return EXIT_OK
    rows = [[a.received_at.strftime("%Y-%m-%d %H:%M:%S"), a.name or "-", a.status, a.host or "-", a.action or "-",
             a.outcome or "-", a.job_id or "-", (a.detail or "")[:60]] for a in found]
    print(table(rows, ["RECEIVED (UTC)", "ALERT", "STATUS", "HOST", "ACTION", "OUTCOME", "JOB", "WHY"]) if rows
          else "no alerts")
    return EXIT_OK


def services_list(args: argparse.Namespace) -> int:
    """Each daemon's row (catalog.services); one that has not reported for three beats is
    SILENT: killed, hung, or cut off from the catalog (a clean stop removes the row)."""
    from datetime import UTC, datetime

    cfg = load_config(args)
    now = datetime.now(UTC)
    found = reader.services(cfg.catalog_url)
    ages = [max(0.0, (now - r.seen_at).total_seconds()) for r in found]
    silent = [age > 3 * BEAT_SECONDS for age in ages]
    if args.json:
        emit_json([{"kind": r.kind, "node": r.node, "hosts": r.hosts.split(",") if r.hosts else [], "pid": r.pid,
                    "version": r.version, "started_at": r.started_at.isoformat(), "seen_at": r.seen_at.isoformat(),
                    "seen_seconds_ago": round(age, 1), "silent": quiet}
                   for r, age, quiet in zip(found, ages, silent, strict=True)])
        return EXIT_OK
    rows = [[r.kind, r.node, r.hosts or "-", str(r.pid), r.version, r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
             f"{age:.0f}s ago" + (" SILENT" if quiet else "")]
            for r, age, quiet in zip(found, ages, silent, strict=True)]
    print(table(rows, ["KIND", "NODE", "HOSTS", "PID", "VERSION", "STARTED (UTC)", "LAST REPORT"]) if rows
          else "no worker, scheduler or listener is running (or none has reported to this catalog)")
    return EXIT_OK


def job_show(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    job = reader.job(cfg.catalog_url, args.job_id)
    if args.json:
        emit_json(job.to_json())
    else:
        for k, v in job.to_json().items():
            if isinstance(v, dict | list):  # params, result: as data, not Python's repr
                v = json.dumps(v, indent=2, default=str).replace("\n", "\n" + " " * 15) if v else "-"
            print(f"{k:14} {'-' if v is None else v}")
    return EXIT_OK if job.state != FAILED else EXIT_FAILED


def doctor(args: argparse.Namespace) -> int:
    from virtwarden.cli.doctor import run_checks

    cfg = load_config(args)
    results = run_checks(cfg)
    if args.json:
        emit_json([r.__dict__ for r in results])
    else:
        for r in results:
            print(f"[{'ok' if r.ok else 'MISSING' if r.required else 'warn':>7}] {r.name}: {r.detail}")
    bad = [r for r in results if r.required and not r.ok]
    if bad and not args.json:
        print(f"\n{len(bad)} required check(s) failed.", file=sys.stderr)
    return EXIT_FAILED if bad else EXIT_OK


def worker(args: argparse.Namespace) -> int:
    from virtwarden.catalog.store import Catalog
    from virtwarden.worker import celery_app

    cfg = load_config(args)
    hosts = args.host or list(cfg.hosts)
    for h in hosts:
        cfg.host(h)  # unknown host names are an error before anything starts
    _qemu_passage(cfg, hosts)  # before anything is created: it decides directory modes
    Catalog(cfg.catalog_url).close()  # create or upgrade the schema once, before the pool forks
    app = celery_app.configure(cfg)
    celery_app.serving(hosts)
    queues = ",".join(celery_app.queue_for(h) for h in hosts)
    argv = ["worker", "-Q", queues, "--concurrency", str(args.concurrency or cfg.worker.concurrency),
            "-n", f"virtwarden-{'+'.join(hosts)}@%h", "--loglevel", args.log_level.upper(),
            "--without-gossip", "--without-mingle"]
    # What is imported and built by now lives as long as the worker: moved out of the
    # collector's reach, so that the collection Celery runs before it forks each pool
    # process (about 70 ms of a core over these objects) finds nothing to do, and the
    # children's collections do not write to pages they share with this process.
    gc.freeze()
    # app.start, not worker_main: worker_main drops the exit code, and a worker that
    # stops on an unrecoverable error (kombu can raise one when the broker goes away
    # while a job's message is unacknowledged) must exit non-zero, so its supervisor
    # (systemd: Restart=) starts it again instead of leaving the host without a worker.
    code = app.start(argv)
    return int(code or EXIT_OK)


def _qemu_passage(cfg, hosts: list[str]) -> None:
    """Directories are 0700, but an unprivileged QEMU (qemu.conf's user, Debian's
    libvirt-qemu) must pass through those holding the images libvirt hands it: backup
    targets, a drill's disks. Ask each host's libvirt who QEMU runs as; when one does
    not answer, assume it is unprivileged (backups that work, directories others may
    pass through but never list, files still 0600)."""
    import logging

    from virtwarden import permissions
    from virtwarden.errors import VirtwardenError
    from virtwarden.hypervisor import connect

    log = logging.getLogger("virtwarden.worker")
    uids = []
    for h in hosts:
        try:
            # No keepalive: its event loop would have to run in this process, which
            # forks the pool next (each pool process starts its own at its first job).
            with connect(h, cfg.host(h).uri, keepalive=False) as hv:
                user = hv.qemu_user()
        except VirtwardenError as e:
            log.warning("host %s: cannot ask libvirt which user QEMU runs as (%s); assuming an "
                        "unprivileged one", h, e)
            user = None
        uids.append(user[0] if user else 1)
    unprivileged = next((uid for uid in uids if uid != 0), None)
    if permissions.allow_qemu_passage(unprivileged):
        log.info("QEMU runs as uid %s: directories libvirt writes into are 0711 (passable, not listable)",
                 unprivileged)
        roots = [cfg.scratch_dir(h) for h in hosts]
        roots += [Path(st.path) for st in cfg.storage.values() if st.type == "nfs"]
        permissions.let_qemu_through(roots)

