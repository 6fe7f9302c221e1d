"""The ``virtwarden`` command line.

Built for an on-call engineer: plain tables, ``--json`` for scripts, a progress line on
long waits, and exit codes that mean something (virtwarden.errors: 0 ok, 1 failed,
2 usage, 3 configuration, 4 not found, 5 a service unreachable, 6 storage,
7 hypervisor, 70 a bug, 141 the reader of our output went away). Every error is one
clear line on stderr.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import select
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from virtwarden import __version__, permissions
from virtwarden.errors import EXIT_BUG, EXIT_USAGE, VirtwardenError
from virtwarden.redact import install_log_masking, mask

log = logging.getLogger("virtwarden")
Handler = Callable[[argparse.Namespace], int]
JSON_HELP = "print the result as JSON (for scripts; the same fields as the API)"
EXIT_OUTPUT_CLOSED = 141  # what a shell reports for a command its pipe's reader left (128 + SIGPIPE)


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything is created: what this process writes (itself, or through qemu-img)
    # is readable by its user only. Modes that may be wider are set explicitly.
    permissions.restrict_umask()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_log_masking()  # no password of a URL reaches a log line, whoever logs it
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not as noise at exit
        return code
    except BrokenPipeError:
        if _stdout_closed():
            return _quietly_closed()
        log.exception("unexpected error (a bug: please report it with this traceback)")
        return EXIT_BUG
    except VirtwardenError as e:
        print(f"virtwarden: error: {mask(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("virtwarden: interrupted", file=sys.stderr)
        return 130
    except Exception:  # the one place a bug becomes an exit code
        log.exception("unexpected error (a bug: please report it with this traceback)")
        return EXIT_BUG


def run() -> NoReturn:
    """The ``virtwarden`` executable (and ``python -m virtwarden.cli``): ``main()``, then
    ``leave`` with its exit code."""
    leave(main())


def leave(code: int) -> NoReturn:
    """End the process with ``code`` once everything is said, without the interpreter's
    teardown. Measured: freeing every module and object of SQLAlchemy, pydantic, Celery
    and kombu one by one took 0.25-0.3 s at the end of each command that submits a job,
    after its output was complete. The exit handlers still run (logging's flush, a
    multiprocessing child's join) and the standard streams are flushed; while a thread
    other than a daemon still runs, or a stream cannot be flushed (its reader went
    away), the interpreter's own exit is taken instead, which waits for the thread and
    reports as it always did; the same under a profiler or a tracer (cProfile writes its
    profile after the command returns)."""
    main_thread = threading.main_thread()
    if sys.getprofile() is not None or sys.gettrace() is not None or \
            any(t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()  # they run once: the interpreter's exit would find none left
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def _stdout_closed() -> bool:
    """Whether the reader of our standard output is gone (``... --json | head``): the
    write end of a pipe whose read end is closed polls as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):  # not a file descriptor (a test's StringIO)
        return False


def _quietly_closed() -> int:
    """Nothing left to say to anyone: point stdout at /dev/null so that the interpreter's
    own flush at exit raises nothing, and exit as a piped command does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OUTPUT_CLOSED


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: built once per process (about 10 ms of a core; parsing
    does not change it, and where it prints is looked up when it prints)."""
    p = argparse.ArgumentParser(
        prog="virtwarden",
        description="Keeps KVM/libvirt guests safe: policy-driven backups, snapshots, restores, restore drills,"
                    " verification of stored backups and evacuations, the workers and daemons that run them,"
                    " a catalog that can be rebuilt from storage, and on-call runbooks.")
    p.add_argument("--version", action="version", version=f"virtwarden {__version__}")
    p.add_argument("--config", help="configuration file (default: $VIRTWARDEN_CONFIG, else embedded defaults)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(metavar="COMMAND")

    def cmd(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(handler=handler)
        return sp

    pol = sub.add_parser("policy", help="validate and list policies").add_subparsers(metavar="ACTION")
    v = pol.add_parser("validate", help="check policy files; errors as file:line: field: message")
    v.add_argument("paths", nargs="+", help="policy or runbook files, or directories of them")
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    v.set_defaults(handler=lazy("virtwarden.cli.commands:policy_validate"))
    pl = pol.add_parser("list", help="list the policies in policy_dir")
    pl.add_argument("--json", action="store_true", help=JSON_HELP)
    pl.set_defaults(handler=lazy("virtwarden.cli.commands:policy_list"))

    b = cmd("backup", lazy("virtwarden.cli.commands:backup"), "back up a domain now (a worker runs it)")
    b.add_argument("domain")
    b.add_argument("--policy", help="take settings from this policy")
    b.add_argument("--target", help="storage target (overrides the policy's)")
    b.add_argument("--full", action="store_true", help="start a new chain with a full backup")
    b.add_argument("--host", help="the domain's host (default: look on every configured host)")
    _wait_opts(b)

    bs = cmd("backups", lazy("virtwarden.cli.commands:backups"), "list a domain's restore points")
    bs.add_argument("domain")
    bs.add_argument("--json", action="store_true", help=JSON_HELP)

    r = cmd("restore", lazy("virtwarden.cli.commands:restore"),
            "restore a point: into a directory of flat images, as a new domain, or in place")
    r.add_argument("domain")
    point = r.add_mutually_exclusive_group()
    point.add_argument("--point", default="latest", help="restore point id, or 'latest' (default)")
    point.add_argument("--at", metavar="TIME",
                       help="the last complete point at or before TIME (ISO 8601, e.g. 2025-03-30T14:00Z; "
                            "without a zone it is this machine's local time)")
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-dir", help="directory for vda.qcow2, vdb.qcow2, ... and domain.xml")
    mode.add_argument("--as-domain", metavar="NAME",
                      help="define a new domain NAME (new UUID and MACs) on the restored disks")
    mode.add_argument("--in-place", action="store_true",
                      help="shut the domain off and replace its disks"
                           " (the current ones are kept aside until it worked)")
    r.add_argument("--discard-old", action="store_true",
                   help="with --in-place: delete the replaced disks once the restore succeeded (default: keep them)")
    r.add_argument("--start", action="store_true", help="with --as-domain or --in-place: start the domain afterwards")
    r.add_argument("--disk-dir", metavar="DIR",
                   help="with --as-domain: put the new images here (default: beside the original domain's images)")
    r.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="with --in-place: how long a clean shutdown may take before the domain is powered off "
                        "(default 120)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (chain, bytes to read, where each disk goes)")
    r.add_argument("--host", help="host whose worker does the work (default: where the backup was made)")
    _wait_opts(r)

    co = cmd("completion", lazy("virtwarden.cli.completion:cli"),
             "print a shell completion script: source <(virtwarden completion bash)")
    co.add_argument("shell", choices=["bash", "zsh"],
                    help="bash; zsh runs the same script after: autoload -U +X bashcompinit && bashcompinit")
    j = cmd("jobs", lazy("virtwarden.cli.commands:jobs_list"), "recent jobs")
    j.add_argument("--json", action="store_true", help=JSON_HELP)
    j.add_argument("--domain")
    j.add_argument("--limit", type=int, default=30)
    al = cmd("alerts", lazy("virtwarden.cli.commands:alerts_list"),
             "Alertmanager alerts received and what became of each")
    al.add_argument("--json", action="store_true", help="the rows as a JSON list (as GET /v1/alerts)")
    al.add_argument("--host", help="only alerts naming this host")
    al.add_argument("--limit", type=int, default=30, help="the last N alerts (default 30)")
    sv = cmd("services", lazy("virtwarden.cli.commands:services_list"),
             "the running workers, schedulers and listeners, as each last reported")
    sv.add_argument("--json", action="store_true", help=JSON_HELP)
    js = cmd("job", lazy("virtwarden.cli.commands:job_show"), "one job in full")
    js.add_argument("job_id")
    js.add_argument("--json", action="store_true", help=JSON_HELP)

    d = cmd("doctor", lazy("virtwarden.cli.commands:doctor"),
            "check what this host needs and say plainly what is missing")
    d.add_argument("--json", action="store_true", help=JSON_HELP)

    w = cmd("worker", lazy("virtwarden.cli.commands:worker"),
            "run a worker for the given hosts' queues (default: every configured host)")
    w.add_argument("--host", action="append", default=[], help="serve this host's queue (repeatable)")
    w.add_argument("--concurrency", type=int, help="jobs at once (default: worker.concurrency)")

    ls = cmd("listen", lazy("virtwarden.daemons.listener:cli"),
             "follow libvirt events of the configured hosts and start the jobs policies ask for")
    ls.add_argument("--host", action="append", default=[], help="listen to this host only (repeatable)")

    sc = cmd("scheduler", lazy("virtwarden.daemons.scheduler:cli"),
             "start scheduled backups, snapshots, drills and verifications")
    sc.add_argument("--once", action="store_true", help="one pass over due slots, then exit")
    sched = sub.add_parser("schedule", help="what the scheduler would do").add_subparsers(metavar="ACTION")
    pv = sched.add_parser("preview", help="list the slots that would run between two times")
    pv.add_argument("--from", dest="start", help="ISO time (default: now)")
    pv.add_argument("--to", dest="end", help="ISO time (default: 24 hours after --from)")
    pv.add_argument("--json", action="store_true", help=JSON_HELP)
    pv.set_defaults(handler=lazy("virtwarden.daemons.scheduler:preview_cli"))
    ss_ = sched.add_parser("slots", help="slots the scheduler decided lately: started, deferred (waiting for "
                                          "a limit) or skipped, and why")
    ss_.add_argument("--state", choices=["started", "deferred", "skipped"], help="only slots in this state")
    ss_.add_argument("--domain", help="only this domain's slots")
    ss_.add_argument("--hours", type=float, default=24.0,
                     help="slots whose time came within the last N hours (default 24)")
    ss_.add_argument("--json", action="store_true", help=JSON_HELP)
    ss_.set_defaults(handler=lazy("virtwarden.cli.commands:slots_list"))

    pr = cmd("prune", lazy("virtwarden.cli.prune:cli"),
             "apply retention: delete restore points the policies no longer keep")
    pr.add_argument("domain", nargs="?", help="only this domain (default: every domain with points)")
    pr.add_argument("--policy", help="use this policy's retention")
    pr.add_argument("--dry-run", action="store_true", help="show what would be deleted, change nothing")
    _wait_opts(pr)

    sn = cmd("snapshot", lazy("virtwarden.cli.snapshots:cli"),
             "take a snapshot of a domain now (policy naming and retention)")
    sn.add_argument("domain")
    sn.add_argument("--policy", help="take settings from this policy")
    sn.add_argument("--host", help="the domain's host (default: look on every configured host)")
    _wait_opts(sn)
    sl = cmd("snapshots", lazy("virtwarden.cli.snapshots:list_cli"), "list the snapshots virtwarden made of a domain")
    sl.add_argument("domain")
    sl.add_argument("--json", action="store_true", help=JSON_HELP)

    dr = cmd("drill", lazy("virtwarden.cli.drills:cli"),
             "restore a point into scratch space and boot it as an isolated throwaway domain")
    dr.add_argument("domain")
    dr.add_argument("--point", help="restore point id, 'latest' or 'oldest' (default: the policy's drill.point,"
                                    " else latest)")
    dr.add_argument("--policy", help="take drill settings from this policy")
    dr.add_argument("--host", help="host to run the drill on (default: where the backup was made)")
    _wait_opts(dr)
    dl = cmd("drills", lazy("virtwarden.cli.drills:list_cli"), "recent restore drills of a domain and their checks")
    dl.add_argument("domain", nargs="?")
    dl.add_argument("--json", action="store_true", help=JSON_HELP)

    vf = cmd("verify", lazy("virtwarden.cli.verify:cli"),
             "re-read stored restore points and check their checksums; damaged ones are taken out of service")
    vf.add_argument("domain", nargs="?", help="only this domain (default: every domain with points)")
    vf.add_argument("--storage", help="only points on this storage target")
    vf.add_argument("--sample", type=_percent, default=100, metavar="PERCENT",
                    help="re-read this percentage of the artifacts, least recently verified points first"
                         " (default 100: all)")
    vf.add_argument("--dry-run", action="store_true", help="say what would be read, from the catalog; create no job")
    _wait_opts(vf)

    ca = sub.add_parser("catalog", help="the catalog itself").add_subparsers(metavar="ACTION")
    cr = ca.add_parser("rebuild", help="recreate restore points from a storage target's manifests")
    cr.add_argument("--storage", required=True, help="the storage target to read")
    cr.add_argument("--dry-run", action="store_true", help="show what would be imported, change nothing")
    cr.add_argument("--json", action="store_true", help=JSON_HELP)
    cr.set_defaults(handler=lazy("virtwarden.cli.rebuild:cli"))

    api = cmd("api", lazy("virtwarden.api.app:cli"), "serve the HTTP API (restores, jobs, alerts, metrics)")
    api.add_argument("--listen", help="HOST:PORT (default: api.listen from the configuration)")

    rb = sub.add_parser("runbook", help="named, audited on-call procedures").add_subparsers(metavar="ACTION")
    rbl = rb.add_parser("list", help="built-in and user-defined runbooks")
    rbl.add_argument("--json", action="store_true", help=JSON_HELP)
    rbl.set_defaults(handler=lazy("virtwarden.runbooks:list_cli"))
    rbs = rb.add_parser("show", help="a runbook's parameters and steps")
    rbs.add_argument("name")
    rbs.add_argument("--json", action="store_true", help=JSON_HELP)
    rbs.set_defaults(handler=lazy("virtwarden.runbooks:show_cli"))
    rbr = rb.add_parser("run", help="run a runbook's steps in order, each as a job, waiting for each (audited)")
    rbr.add_argument("name")
    rbr.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    rbr.add_argument("--dry-run", action="store_true", help="print every step's plan, change nothing")
    rbr.add_argument("--timeout", type=float, help="give up waiting for a step after this many seconds")
    rbr.add_argument("--json", action="store_true", help=JSON_HELP)
    rbr.set_defaults(handler=lazy("virtwarden.runbooks:run_cli"))

    ev = cmd("evacuate", lazy("virtwarden.cli.evacuate:cli"), "live-migrate a host's running domains to other hosts")
    ev.add_argument("host")
    ev.add_argument("--to", action="append", default=[], metavar="HOST", help="only to these hosts (repeatable)")
    ev.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _wait_opts(ev)
    hs = cmd("hosts", lazy("virtwarden.cli.hosts:cli"), "the configured hosts: reachable or not, free memory and CPUs")
    hs.add_argument("--json", action="store_true", help=JSON_HELP)

    ky = sub.add_parser("key", help="the key of a format-2 repository (docs/repository-format.md)"
                        ).add_subparsers(metavar="ACTION")
    pass_help = "file whose first line is the passphrase (default: the target's passphrase_file, " \
                "$VIRTWARDEN_KEY_PASSPHRASE, or a prompt)"
    ki = ky.add_parser("init", help="create a repository key, its key file, and the repository on the storage")
    ki.add_argument("storage", help="a storage target configured with format: 2")
    ki.add_argument("--passphrase-file", help=pass_help)
    ki.add_argument("--chunk-size-kib", type=int, help="the repository's chunk size (default 512)")
    ki.add_argument("--kdf-memory-mib", type=int, default=128, choices=[16, 32, 64, 128, 256, 512, 1024],
                    help="the memory scrypt takes to open the key file (default 128): each guess at the"
                         " passphrase costs an attacker holding the file as much, and so does each process"
                         " that opens it (its time grows alike, about 0.3 s at 128)")
    ki.add_argument("--json", action="store_true", help=JSON_HELP)
    ki.set_defaults(handler=lazy("virtwarden.cli.keys:init"))
    ke = ky.add_parser("export", help="print the key file (still locked by its passphrase), to keep a copy")
    ke.add_argument("storage")
    ke.add_argument("--to", metavar="FILE", help="write it to FILE (0600, never over an existing file)")
    ke.set_defaults(handler=lazy("virtwarden.cli.keys:export"))
    kim = ky.add_parser("import", help="install a copy of the key file of the repository the storage holds")
    kim.add_argument("storage")
    kim.add_argument("file", help="the key file to install")
    kim.add_argument("--passphrase-file", help=pass_help)
    kim.set_defaults(handler=lazy("virtwarden.cli.keys:import_"))
    kp = ky.add_parser("passwd", help="lock the same key with a new passphrase")
    kp.add_argument("storage")
    kp.add_argument("--passphrase-file", help="the current passphrase: " + pass_help)
    kp.add_argument("--new-passphrase-file", help="file whose first line is the new passphrase (or a prompt)")
    kp.set_defaults(handler=lazy("virtwarden.cli.keys:passwd"))

    st = sub.add_parser("storage", help="a format-2 repository read with only the storage and its key (no catalog)"
                        ).add_subparsers(metavar="ACTION")
    sp_ = st.add_parser("points", help="the points the repository holds, from their manifests")
    sp_.add_argument("storage")
    sp_.add_argument("--domain", help="only this domain's")
    sp_.add_argument("--json", action="store_true", help=JSON_HELP)
    sp_.set_defaults(handler=lazy("virtwarden.cli.storage:points_cli"))
    sr = st.add_parser("restore", help="write a point's disks (qcow2) and domain XML into a new or empty directory")
    sr.add_argument("storage")
    sr.add_argument("point", help="the point's id (virtwarden storage points)")
    sr.add_argument("--to-dir", required=True, help="a new or empty directory")
    sr.add_argument("--json", action="store_true", help=JSON_HELP)
    sr.set_defaults(handler=lazy("virtwarden.cli.storage:restore_cli"))
    ss = st.add_parser("stats", help="bytes in the points, bytes stored, dedup and compression, per domain")
    ss.add_argument("storage")
    ss.add_argument("--json", action="store_true", help=JSON_HELP)
    ss.set_defaults(handler=lazy("virtwarden.cli.storage:stats_cli"))
    sg = st.add_parser("gc", help="delete the chunks no point uses (never while a backup writes)")
    sg.add_argument("storage")
    sg.add_argument("--json", action="store_true", help=JSON_HELP)
    sg.set_defaults(handler=lazy("virtwarden.cli.storage:gc_cli"))
    return p


def lazy(target: str) -> Handler:
    """A handler imported when its command runs, so one module's import cost or error
    never touches another command."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        module, name = target.split(":")
        return int(getattr(importlib.import_module(module), name)(args))

    return handler


def _percent(text: str) -> int:
    from virtwarden.cli.verify import percent

    return percent(text)


def _wait_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the job; exit non-zero if it fails")
    p.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
