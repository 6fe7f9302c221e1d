"""``python -m bench.recovery``: what a restore costs the people waiting for it.

One OS-less guest with --data-gib of random data, one full backup to a local-directory
target, then, --repeat times each:

- ``restore --to-dir``: the baseline, the whole restore job;
- ``restore --in-place --start``: the whole job, and how long the domain was not running
  (the images are rebuilt while it runs, so only the shutdown, the swap and the start
  count); the guest has no OS, so the clean shutdown request waits --shutdown-timeout
  and then the domain is powered off;
- ``drill``: the drill's own restore and boot times as it records them, and the job;
- ``snapshot``: an internal (disks and memory) and an external (disk-only) snapshot.

Prints medians [min-max] and ratios to the baseline. Everything it made is removed.
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import libvirt
import yaml

from bench.guest import BenchGuest, GiB
from bench.product import Installation
from bench.run import _interrupted, _quietly, s3_settings, say
from bench.stats import Series, ratio, spread

URI = "qemu:///system"


class Downtime:
    """Samples a domain's state every 20 ms in a thread; sums the time it was not running."""

    def __init__(self, conn: libvirt.virConnect, name: str) -> None:
        self.conn, self.name = conn, name
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Downtime:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.02):
            now = time.monotonic()
            try:
                running = bool(self.conn.lookupByName(self.name).isActive())
            except libvirt.libvirtError:
                running = False
            if not running:
                self.seconds += now - last
            last = now


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    p.add_argument("--disk-gib", type=float, default=2.0, help="guest disk size (default 2)")
    p.add_argument("--data-gib", type=float, default=1.0, help="random data written into it (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--shutdown-timeout", type=float, default=1.0,
                   help="seconds the in-place restore waits for a clean shutdown (default 1: no OS to answer)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="broker for the run's worker")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the samples to FILE")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    token = secrets.token_hex(4)
    conn = libvirt.open(URI)
    series = {k: Series("s") for k in ("restore to dir", "restore in place", "in-place downtime", "drill job",
                                    "drill restore", "drill boot", "internal snapshot", "external snapshot")}
    with ExitStack() as cleanup:
        cleanup.callback(conn.close)
        args.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"virtwarden-recovery-{token}-", dir=args.workdir))
        cleanup.callback(_quietly("removing " + str(root), lambda: shutil.rmtree(root)))
        inst = Installation(root / "install", host=f"bench-{token}", broker_url=args.redis_url,
                            s3=s3_settings("http://127.0.0.1:1", "unused"))
        inst.write_config()
        _add_policy(inst, root / "policies")
        cleanup.callback(_quietly("removing broker keys", inst.forget_queue))
        cleanup.callback(_quietly("stopping the worker", inst.stop_worker))
        inst.start_worker()
        guest = BenchGuest(conn, f"vwbench-{token}", root / "guest", args.disk_gib)
        cleanup.callback(_quietly("removing guest " + guest.name, guest.remove))
        say(f"creating {guest.name} with {args.data_gib:g} GiB of random data")
        guest.create()
        guest.fill(int(args.data_gib * GiB))
        inst.run_job("backup", guest.name, "--target", "nfs")
        for i in range(args.repeat):
            say(f"repeat {i + 1} of {args.repeat}")
            out = root / f"restored-{i}"
            series["restore to dir"].add(inst.run_job("restore", guest.name, "--to-dir", str(out)).job_seconds)
            shutil.rmtree(out)
            with Downtime(conn, guest.name) as down:
                run = inst.run_job("restore", guest.name, "--in-place", "--start", "--discard-old",
                                   "--shutdown-timeout", f"{args.shutdown_timeout:g}")
            series["restore in place"].add(run.job_seconds)
            series["in-place downtime"].add(down.seconds)
            drill = json.loads(inst.cli("drill", guest.name, "--wait", "--json").stdout)
            series["drill job"].add(_seconds(drill))
            series["drill restore"].add(drill["drill"]["restore_seconds"])
            series["drill boot"].add(drill["drill"]["boot_seconds"])
            for kind in ("internal", "external"):  # one at a time: libvirt 9 cannot delete mixed chains
                _write_policy(root / "policies", kind)
                series[f"{kind} snapshot"].add(inst.run_job("snapshot", guest.name).job_seconds)
                _drop_snapshots(conn, guest.name)
        print(_report(series, args))
        if args.json:
            args.json.write_text(json.dumps({k: s.to_json() for k, s in series.items()}, indent=2))
        say("cleaning up")
    return 0


def _add_policy(inst: Installation, pdir: Path) -> None:
    pdir.mkdir(parents=True)
    _write_policy(pdir, "internal")
    doc = yaml.safe_load(inst.config_path.read_text())
    doc["policy_dir"] = str(pdir)
    inst.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_policy(pdir: Path, snapshot_type: str) -> None:
    (pdir / "bench.yaml").write_text(yaml.safe_dump({
        "apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "bench"},
        "spec": {"selector": {"domains": ["vwbench-*"]}, "backup": {"target": "nfs"},
                 "snapshots": {"type": snapshot_type},
                 "drill": {"run_for": "3s"}}}))


def _drop_snapshots(conn: libvirt.virConnect, name: str) -> None:
    """The next in-place restore refuses a domain with snapshots: remove ours."""
    for snap in conn.lookupByName(name).listAllSnapshots():
        snap.delete(0)


def _seconds(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()


def _report(s: dict[str, Series], args: argparse.Namespace) -> str:
    base = s["restore to dir"]
    lines = [f"recovery, {args.data_gib:g} GiB of random data in a {args.disk_gib:g} GiB qcow2,"
             f" medians of {args.repeat} [min-max], seconds", ""]
    for name, series in s.items():
        note = ""
        if name in ("restore in place", "drill restore", "drill job"):
            note = f"  {ratio(series, base):.2f}x restore to dir"
        if name == "in-place downtime":
            note = f"  {series.median / s['restore in place'].median:.0%} of the in-place job"
        lines.append(f"{name:20} {spread(series):>22}{note}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it made was removed", file=sys.stderr)
        sys.exit(130)
