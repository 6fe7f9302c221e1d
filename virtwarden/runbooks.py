"""``virtwarden runbook list|show|run``: named, audited on-call procedures.

A run is a job of kind ``runbook`` (so ``virtwarden jobs`` shows it, with each step's
job in its result) driven by the process that started it: each step becomes an
ordinary job (restore, drill, evacuate, verify, backup, snapshot) sent to the right
host's workers, and the run waits for it before the next step; a failed step stops the
run. The run's job row is leased and kept fresh like a worker's, so if the process
dies the reaper hands the row to a worker, which fails it saying so; the step jobs
already queued still run.

Every run, dry runs included, writes an audit record: who (the sudo caller or user, at
which machine), when, the parameters, the run's job and its outcome.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtwarden.catalog import audit, jobs
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.config import Config
from virtwarden.errors import EXIT_FAILED, EXIT_OK, JobFailed, NotFound, VirtwardenError
from virtwarden.policies.loader import load_runbooks
from virtwarden.policies.runbooks import Planned, Runbook, render
from virtwarden.validation import suggest

# --- the actions ------------------------------------------------------------------------
# Each step is submitted like any other request (virtwarden.submit); all a runbook adds
# is turning its text arguments into the request's subject and options.

def _restore_args(a: dict) -> dict:
    return {"point": a.get("point", "latest") if not a.get("at") else "latest", "at": a.get("at"),
            "to_dir": a.get("to_dir"), "as_domain": a.get("as_domain"), "in_place": bool(a.get("in_place")),
            "start": bool(a.get("start")), "discard_old": bool(a.get("discard_old"))}


def _hosts(a: dict) -> tuple[str, ...]:
    return tuple(h.strip() for h in str(a.get("to") or "").split(",") if h.strip())


ARGS: dict[str, Callable[[dict], tuple[str | None, dict[str, Any]]]] = {
    "backup": lambda a: (a["domain"], {"policy": a.get("policy"), "full": bool(a.get("full"))}),
    "snapshot": lambda a: (a["domain"], {"policy": a.get("policy")}),
    "restore": lambda a: (a["domain"], _restore_args(a)),
    "drill": lambda a: (a["domain"], {"point": a.get("point"), "policy": a.get("policy")}),
    "evacuate": lambda a: (a["host"], {"to": _hosts(a)}),
    "verify": lambda a: (a.get("domain") or None, {"storage": a.get("storage") or None,
                                                   "sample_percent": int(a.get("sample_percent") or 100)}),
}


def plan_step(cfg: Config, cat: Catalog, action: str, a: dict) -> dict:
    """What the step would do; changes nothing."""
    from virtwarden import submit

    subject, options = ARGS[action](a)
    return submit.plan(cfg, cat, action, subject, **options).preview


def submit_step(cfg: Config, cat: Catalog, action: str, a: dict, actor: str, key: str) -> jobs.JobView:
    from virtwarden import submit

    subject, options = ARGS[action](a)
    return submit.submit(cfg, cat, action, subject, requested_by=actor, dedup_key=key, **options)


# --- running ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunbookRequest:
    """The parameters of a runbook run's job row (for the record; a worker never runs it)."""

    runbook: str
    params: dict
    steps: list


def orphaned(_ctx: Any, req: RunbookRequest) -> dict:
    """What a worker does with a run whose process died: fail it, saying so."""
    raise VirtwardenError(f"runbook {req.runbook}: the process running it stopped before it finished; step jobs"
                          " it had queued still run (see `virtwarden jobs`); run the runbook again to go on")


def find(cfg: Config, name: str) -> Runbook:
    books = load_runbooks(cfg.policies_path)
    for book in books:
        if book.name == name:
            return book
    names = [b.name for b in books]
    raise NotFound(f"no runbook named {name!r}{suggest(name, names)} (known: {', '.join(names)})")


def parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VirtwardenError(f"parameter {pair!r}: write it as -p KEY=VALUE")
        out[key.strip()] = value
    return out


def dry_run(cfg: Config, cat: Catalog, book: Runbook, given: dict[str, str], actor: str) -> dict:
    steps = render(book, given)
    planned = []
    for step in steps:
        planned.append({"step": step.index, "action": step.action, "args": step.args,
                        "plan": plan_step(cfg, cat, step.action, step.args)})
    audit.record(cat, actor=actor, action=f"runbook:{book.name}", target=_target(steps), params=given,
                 outcome=audit.DRY_RUN, detail=f"{len(steps)} step(s) planned")
    return {"runbook": book.name, "dry_run": True, "steps": planned}


@dataclass
class Started:
    """A run whose job row exists and is leased to this process (``start``); ``drive``
    runs its steps."""

    book: Runbook
    given: dict[str, str]
    steps: list[Planned]
    parent: jobs.JobView
    record_id: int
    fence: Any  # catalog.fencing.Fence
    beat: Any  # worker.runner.Heartbeat


def start(cfg: Config, cat: Catalog, book: Runbook, given: dict[str, str], actor: str) -> Started:
    """Check the parameters and the broker, then create the run's job row (leased to
    this process, kept fresh from now on) and its audit record."""
    from virtwarden.worker import celery_app
    from virtwarden.worker.runner import Heartbeat, owner_id

    steps = render(book, given)  # a bad parameter is an error before anything starts
    celery_app.check_broker(cfg)
    # Two attempts: this process's, and the one the reaper gives a worker when this
    # process dies, which only fails the run saying why (``orphaned``). With one, the
    # reaper failed it itself as a job its "worker" lost, which misleads.
    parent = jobs.create(cat, kind="runbook", domain=_target(steps), host=next(iter(cfg.hosts)),
                         params={"runbook": book.name, "params": given,
                                 "steps": [{"action": s.action, "args": s.args} for s in steps]},
                         max_attempts=2, requested_by=actor)
    record = audit.record(cat, actor=actor, action=f"runbook:{book.name}", target=_target(steps), params=given,
                          job_id=parent.id)
    claim = jobs.claim(cat, parent.id, owner_id(), cfg.worker.lease_seconds, lock_domain=False)
    assert claim.ok and claim.fence is not None, claim.why
    beat = Heartbeat(cat, claim.fence, cfg.worker.heartbeat_seconds)
    beat.start()
    return Started(book, given, steps, parent, record.id, claim.fence, beat)


def run(cfg: Config, cat: Catalog, book: Runbook, given: dict[str, str], actor: str, *,
        timeout: float | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run every step in order, each as a job; returns the report. JobFailed when a
    step failed (the report is in its ``report`` attribute)."""
    return drive(cfg, cat, start(cfg, cat, book, given, actor), actor, timeout=timeout, on_step=on_step)


def drive(cfg: Config, cat: Catalog, started: Started, actor: str, *, timeout: float | None = None,
          on_step: Callable[[dict], None] | None = None) -> dict:
    """Run the steps of a started run in order, waiting for each; the report."""
    book, steps, beat = started.book, started.steps, started.beat
    report: dict[str, Any] = {"runbook": book.name, "job_id": started.parent.id, "params": started.given, "steps": []}
    failed: str | None = None
    try:
        for step in steps:
            entry = _run_step(cfg, cat, step, actor, f"runbook:{started.parent.id}:{step.index}", timeout, beat,
                              len(steps))
            report["steps"].append(entry)
            if on_step:
                on_step(entry)
            if entry["state"] != jobs.SUCCEEDED:
                failed = f"step {step.index} ({step.action}) failed: {entry['error']}"
                break
    except VirtwardenError as e:
        failed = f"step {len(report['steps']) + 1} could not start: {e}"
        report["steps"].append({"step": len(report["steps"]) + 1, "state": "not started", "error": str(e)})
    finally:
        beat.stop()
    report["state"] = jobs.FAILED if failed else jobs.SUCCEEDED
    report["summary"] = failed or f"{len(steps)} step(s) succeeded"
    jobs.finish(cat, started.fence, ok=not failed, result=report, error=failed)
    audit.finish(cat, started.record_id, audit.FAILED if failed else audit.SUCCEEDED, report["summary"])
    if failed:
        err = JobFailed(f"runbook {book.name} (job {started.parent.id}): {failed}")
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report


def _run_step(cfg: Config, cat: Catalog, step: Planned, actor: str, key: str, timeout: float | None,
              beat: Any, count: int) -> dict:
    from virtwarden import submit

    beat.report((step.index - 1) / count, f"step {step.index}/{count}: {step.action}")
    job = submit_step(cfg, cat, step.action, step.args, actor, key)
    try:
        done = submit.wait(cat, job.id, timeout=timeout)
    except JobFailed:
        done = jobs.get(cat, job.id)
    return {"step": step.index, "action": step.action, "args": step.args, "job_id": job.id, "state": done.state,
            "error": done.error, "result": done.result}


def _target(steps: list[Planned]) -> str | None:
    for s in steps:
        for key in ("domain", "host"):
            if s.args.get(key):
                return str(s.args[key])
    return None


# --- commands -----------------------------------------------------------------------------

def list_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    books = load_runbooks(cfg.policies_path)
    if args.json:
        emit_json([b.summary() for b in books])
        return EXIT_OK
    rows = [[b.name, "built-in" if b.builtin else b.source_text,
             " ".join(f"{k}{'*' if p.required else ''}" for k, p in b.spec.params.items()),
             b.spec.description or b.metadata.description or ""] for b in books]
    print(table(rows, ["NAME", "SOURCE", "PARAMS (* required)", "DESCRIPTION"]))
    return EXIT_OK


def show_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    book = find(cfg, args.name)
    if args.json:
        emit_json(book.summary())
        return EXIT_OK
    print(f"{book.name}: {book.spec.description or book.metadata.description or ''}")
    print(f"source: {'built-in' if book.builtin else book.source_text}\n")
    rows = [[k, "yes" if p.required else "no", "" if p.default is None else repr(p.default), p.help]
            for k, p in book.spec.params.items()]
    print(table(rows, ["PARAM", "REQUIRED", "DEFAULT", "HELP"]) if rows else "no parameters")
    print()
    for i, s in enumerate(book.spec.steps, 1):
        print(f"{i}. {s.action} " + " ".join(f"{k}={v}" for k, v in s.with_.items()))
    return EXIT_OK


def run_cli(args: argparse.Namespace) -> int:
    from virtwarden.worker import celery_app

    cfg = load_config(args)
    cat = Catalog(cfg.catalog_url)
    book = find(cfg, args.name)
    given = parse_params(args.param)
    actor = audit.local_actor()
    if args.dry_run:
        report = dry_run(cfg, cat, book, given, actor)
        if args.json:
            emit_json(report)
        else:
            for s in report["steps"]:
                print(f"step {s['step']}: {s['action']} " + " ".join(f"{k}={v}" for k, v in s["args"].items()))
                for k, v in s["plan"].items():
                    print(f"    {k}: {v}")
            print("dry run: nothing was changed")
        return EXIT_OK
    celery_app.configure(cfg)

    def show(entry: dict) -> None:
        if not args.json:
            print(f"step {entry['step']} {entry['action']}: job {entry['job_id']} {entry['state']}"
                  + (f": {entry['error']}" if entry.get("error") else ""), file=sys.stderr)

    try:
        report = run(cfg, cat, book, given, actor, timeout=args.timeout, on_step=show)
    except JobFailed as e:
        failed = getattr(e, "report", None)
        if failed is None:
            raise
        if args.json:
            emit_json(failed)
        print(f"virtwarden: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        emit_json(report)
    else:
        print(f"runbook {book.name} succeeded (job {report['job_id']}): {report['summary']}")
    return EXIT_OK
