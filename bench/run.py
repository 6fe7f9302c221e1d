"""``python -m bench.run``: virtwarden's backup and restore against the bare operations.

One run creates one OS-less guest with a qcow2 disk of --disk-gib, writes --data-gib of
random data into it while it runs, starts a real ``virtwarden worker`` with a throwaway
configuration (SQLite catalog, a local-directory "nfs" target, a fresh bucket on the S3
endpoint) and drives it with the ``virtwarden`` CLI. Everything it made (guest,
checkpoints, files, bucket, broker keys) is removed at the end, also on error or Ctrl-C.
See docs/benchmarks.md for what each figure means.
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

from bench import host, peer, report
from bench.bare import BareS3
from bench.guest import BenchGuest, GiB, MiB
from bench.product import Installation
from bench.scenario import Bench
from virtwarden.config import S3Storage

URI = "qemu:///system"


TARGETS = ("nfs", "s3", "vault", "vault-s3")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--disk-gib", type=float, default=3.0, help="guest disk size (default 3)")
    p.add_argument("--data-gib", type=float, default=2.0, help="random data written into it (default 2)")
    p.add_argument("--dirty-mib", type=int, default=256, help="random data rewritten before each incremental")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    p.add_argument("--targets", default="nfs,s3,vault,vault-s3",
                   help="storage targets to measure: nfs, s3 (format 1), vault (format 2 in a local "
                        "directory), vault-s3 (format 2 on the S3 endpoint); default all four")
    p.add_argument("--memory-check", action="store_true",
                   help="also back up a second guest holding --memory-check-gib of data, to compare peak memory")
    p.add_argument("--memory-check-gib", type=float, help="data in that second guest (default 2 x --data-gib)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every sample to FILE")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the run's files go (guest image, repository, scratch)")
    p.add_argument("--s3-endpoint", default=os.environ.get("VIRTWARDEN_TEST_S3_ENDPOINT", "http://127.0.0.1:9900"),
                   help="S3 endpoint of the s3 target (default $VIRTWARDEN_TEST_S3_ENDPOINT, else 127.0.0.1:9900)")
    p.add_argument("--redis-url", default=os.environ.get("VIRTWARDEN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                   help="broker for the run's worker (a database the tests do not flush)")
    p.add_argument("--seed", type=int, default=1, help="seed for the offsets of the dirtied data")
    p.add_argument("--no-peer", action="store_true",
                   help="leave out virtnbdbackup (run by default on the same guest, when installed)")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or set(args.targets) - set(TARGETS):
        p.error("--targets takes a comma-separated list of " + ", ".join(TARGETS))
    if args.data_gib > args.disk_gib or args.repeat < 1 or args.dirty_mib < 1:
        p.error("need --data-gib <= --disk-gib, --repeat >= 1 and --dirty-mib >= 1")
    if args.memory_check_gib is None:
        args.memory_check_gib = 2 * args.data_gib
    return args


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _quietly(what: str, step: Callable[[], object]) -> Callable[[], None]:
    """A cleanup step that reports its failure and lets the next one run."""

    def run() -> None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            print(f"bench: cleanup: {what} failed: {e}", file=sys.stderr)

    return run


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def s3_settings(endpoint: str, bucket: str) -> dict[str, Any]:
    """The run's S3 target; part size and concurrency are the product's defaults."""
    fields = S3Storage.model_fields
    return {"type": "s3", "bucket": bucket, "prefix": "backups", "endpoint_url": endpoint, "region": "us-east-1",
            "access_key_id": "testing", "secret_access_key": "testing",
            "part_size_mib": fields["part_size_mib"].default, "max_concurrency": fields["max_concurrency"].default,
            "chunk_concurrency": fields["chunk_concurrency"].default}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    token = secrets.token_hex(4)
    conn = libvirt.open(URI)
    with ExitStack() as cleanup:
        cleanup.callback(conn.close)
        args.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"virtwarden-bench-{token}-", dir=args.workdir))
        cleanup.callback(_quietly("removing " + str(root), lambda: shutil.rmtree(root)))
        machine = host.facts(conn, root)
        machine["virtwarden"] = host.commit(Path(__file__).resolve().parent.parent)
        params: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "disk": f"{args.disk_gib:g} GiB qcow2", "data": f"{args.data_gib:g} GiB random",
            "dirtied per incremental": f"{args.dirty_mib} MiB random over the data, 1 MiB pieces at random "
                                       "4 KiB-aligned offsets",
            "repeat": args.repeat, "targets": ",".join(args.targets),
        }
        caches = host.drop_caches()
        params["page cache dropped"] = "before every timed step" if caches else "no (not permitted here)"

        s3 = None
        settings = s3_settings(args.s3_endpoint, f"vw-bench-{token}")
        if {"s3", "vault-s3"} & set(args.targets):
            s3 = BareS3(settings)
            s3.create_bucket()
            cleanup.callback(_quietly("deleting bucket " + s3.bucket, s3.delete_bucket))
            params["s3"] = (f"{args.s3_endpoint}, part {settings['part_size_mib']} MiB, "
                            f"concurrency {settings['max_concurrency']}, format-2 chunks "
                            f"{settings['chunk_concurrency']} at a time (product defaults)")
        # Scratch on a short path, as /var/lib/virtwarden/scratch is: a format-2 backup's
        # NBD socket (pull mode) lives there and must fit a socket address.
        scratch = Path(tempfile.mkdtemp(prefix="vwb-", dir=args.workdir))
        cleanup.callback(_quietly("removing " + str(scratch), lambda: shutil.rmtree(scratch)))
        inst = Installation(root / "install", host=f"bench-{token}", broker_url=args.redis_url, s3=settings,
                            scratch=scratch)
        inst.write_config()
        cleanup.callback(_quietly("removing broker keys", inst.forget_queue))
        cleanup.callback(_quietly("stopping the worker", inst.stop_worker))
        for target in ("vault", "vault-s3"):
            if target in args.targets:
                inst.init_vault(target)
        say("starting the worker")
        inst.start_worker()

        guest = BenchGuest(conn, f"vwbench-{token}", root / "guest", args.disk_gib)
        cleanup.callback(_quietly("removing guest " + guest.name, guest.remove))
        say(f"creating {guest.name} and writing {args.data_gib:g} GiB of random data into it")
        guest.create()
        guest.fill(int(args.data_gib * GiB))
        why_not = "left out (--no-peer)" if args.no_peer else peer.missing()
        params["peer"] = why_not or f"{peer.version()}, on a twin guest"
        twin = None
        if not why_not:  # virtnbdbackup refuses a guest with checkpoints of another tool
            twin = BenchGuest(conn, f"vwbench-{token}-peer", root / "guest-peer", args.disk_gib)
            cleanup.callback(_quietly("removing guest " + twin.name, twin.remove))
            say(f"creating {twin.name} for virtnbdbackup, the same size and data layout")
            twin.create()
            twin.fill(int(args.data_gib * GiB))
        bench = Bench(inst, guest, s3, args.targets, root / "bare", caches, random.Random(args.seed),
                      int(args.data_gib * GiB), args.dirty_mib * MiB,
                      peer=None if twin is None else peer.Peer(twin, root / "peer"))
        if not caches:
            bench.results.notes.append("the page cache could not be dropped (needs root): steps may read "
                                       "what earlier ones left in memory")
        for i in range(args.repeat):
            say(f"repeat {i + 1} of {args.repeat}")
            bench.repeat()
        big_label = None
        if args.memory_check:
            big_label = f"{args.memory_check_gib:g} GiB"
            say(f"memory check: a second guest with {big_label} of data")
            big = BenchGuest(conn, f"vwbench-{token}-big", root / "guest-big",
                             args.memory_check_gib + max(1.0, args.disk_gib - args.data_gib))
            cleanup.callback(_quietly("removing guest " + big.name, big.remove))
            big.create()
            big.fill(int(args.memory_check_gib * GiB))
            bench.full_peak_rss(big, big_label)
        machine["load_average_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(report.render(bench.results, args.targets, machine, params, big_label))
        if args.json:
            report.write_json(args.json, bench.results, machine, params)
        say("cleaning up")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it made was removed", file=sys.stderr)
        sys.exit(130)
