"""``python -m bench.fleet``: the scheduler over a fleet of simulated hosts.

Each host is libvirt's test driver (``test:///DIR/hNNN.xml``, a node file with its running
domains), so a fleet of hundreds of hosts runs on one machine with no QEMU; the scheduler
lists them, decides slots and creates and sends jobs as it would on real hosts (a real
catalog, SQLite or the PostgreSQL of ``--database``, and the real Redis broker of
``--broker``, whose database is flushed before and after). One policy backs up every
domain at midnight in a 6 h window.

Measured, each the median of ``--runs`` (a slot row recorded a minute before the first
tick tells the scheduler that nothing before it was missed, as on a fleet whose scheduler
ran all along):
- a quiet tick: nothing comes due since the last tick, so no host is listed;
- listing every host, what a tick with any slot due pays before deciding (names only, as
  no policy here selects by metadata; and, for comparison, with every domain's XML);
- the midnight tick of ``--due-hosts`` hosts: every domain's slot comes due, so a job is
  created and sent for each.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

POLICY = """\
apiVersion: virtwarden/v1
kind: Policy
metadata: {name: nightly}
spec:
  selector: {domains: ["*"]}
  backup: {target: nfs, schedule: "0 0 * * *", window: 6h}
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=500, help="hosts of the quiet tick (500)")
    p.add_argument("--domains", type=int, default=40, help="domains per host (40)")
    p.add_argument("--due-hosts", type=int, default=25, help="hosts whose domains all come due at midnight (25)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database", help="a PostgreSQL URL (default: SQLite in the scratch directory)")
    p.add_argument("--broker", default="redis://127.0.0.1:6379/9", help="a Redis database it may flush")
    return p.parse_args(argv)


def fleet(root: Path, hosts: int, domains: int) -> dict[str, dict[str, str]]:
    found = {}
    for h in range(hosts):
        doms = "".join(
            f"<domain type='test'><name>h{h:03d}-vm{d:03d}</name><memory>65536</memory><os><type>hvm</type></os>"
            f"<devices><disk type='file' device='disk'><source file='{root}/h{h:03d}-vm{d:03d}.img'/>"
            f"<target dev='vda' bus='virtio'/></disk></devices></domain>" for d in range(domains))
        node = root / f"h{h:03d}.xml"
        node.write_text(f"<node>{doms}</node>")
        found[f"h{h:03d}"] = {"uri": f"test://{node}"}
    return found


def configure(root: Path, hosts: dict, database: str | None, broker: str):
    from virtwarden import config

    policy = root / "policies" / "nightly.yaml"
    if not policy.exists():  # written once: a policy directory is read again only when it changes
        policy.parent.mkdir()
        policy.write_text(POLICY)
    (root / "store").mkdir(exist_ok=True)
    doc = {"data_dir": str(root / "data"), "broker_url": broker, "hosts": hosts, "policy_dir": str(root / "policies"),
           "storage": {"nfs": {"type": "nfs", "path": str(root / "store")}}}
    if database:
        doc["database_url"] = database
    path = root / "virtwarden.yaml"
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return config.load(str(path), env={})


def flush(broker: str) -> None:
    import redis

    redis.Redis.from_url(broker).flushdb()


def one_run(root: Path, args: argparse.Namespace, hosts: dict, due_hosts: dict
            ) -> tuple[float, float, float, float, int]:
    from virtwarden.catalog.models import ScheduleSlot
    from virtwarden.catalog.store import Catalog
    from virtwarden.worker import celery_app

    from virtwarden.daemons.scheduler import Scheduler

    flush(args.broker)
    quiet_cfg = configure(root, hosts, args.database, args.broker)
    cat = Catalog(quiet_cfg.catalog_url)
    _reset(cat)
    celery_app.configure(quiet_cfg)
    noon = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    clock = [noon]
    with cat.session() as s:  # a scheduler ran until a minute ago: nothing before was missed
        s.add(ScheduleSlot(policy="nightly", job="backup", domain="-", slot_at=noon - timedelta(minutes=1),
                           window_end=noon, state="skipped"))
    sched = Scheduler(quiet_cfg, cat, clock=lambda: clock[0])
    sched.tick()  # its first tick: connections and imports
    clock[0] = noon + timedelta(seconds=30)
    start = time.perf_counter()
    report = sched.tick()
    quiet = time.perf_counter() - start
    assert not report.started and not report.unreachable, report.summary()
    start = time.perf_counter()
    _, unreachable = sched.hosts.domains(metadata=False)  # what a tick with a slot due pays to list the fleet
    listing = time.perf_counter() - start
    assert not unreachable, unreachable
    start = time.perf_counter()
    _, unreachable = sched.hosts.domains(metadata=True)  # the same when some policy selects by metadata
    listing_xml = time.perf_counter() - start
    assert not unreachable, unreachable

    due_cfg = configure(root, due_hosts, args.database, args.broker)
    sched = Scheduler(due_cfg, cat, clock=lambda: clock[0])
    clock[0] = datetime(2026, 12, 7, 23, 59, 30, tzinfo=UTC)
    sched.tick()
    clock[0] = datetime(2026, 12, 8, 0, 0, 5, tzinfo=UTC)
    start = time.perf_counter()
    report = sched.tick()
    midnight = time.perf_counter() - start
    sched.close()
    cat.close()
    flush(args.broker)
    return quiet, listing, listing_xml, midnight, len(report.started)


def _reset(cat) -> None:
    from virtwarden.catalog.models import Base

    with cat.session() as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # a slot line per domain is the daemon's log, not the figures
    with tempfile.TemporaryDirectory(prefix="vw-fleet-") as tmp:
        root = Path(tmp)
        hosts = fleet(root, args.hosts, args.domains)
        due_hosts = dict(list(hosts.items())[:args.due_hosts])
        quiet, listing, listing_xml, midnight, started = [], [], [], [], 0
        for _ in range(args.runs):
            q, li, lx, m, started = one_run(root, args, hosts, due_hosts)
            quiet.append(q)
            listing.append(li)
            listing_xml.append(lx)
            midnight.append(m)
        db = "PostgreSQL" if args.database else "SQLite"
        print(f"fleet: {args.hosts} hosts x {args.domains} domains, {db}, median of {args.runs}")
        print(f"  quiet tick ({args.hosts * args.domains} domains, nothing due: no host listed):"
              f" {statistics.median(quiet) * 1000:.1f} ms (min {min(quiet) * 1000:.1f}, max {max(quiet) * 1000:.1f})")
        print(f"  listing every host (a tick with a slot due): {statistics.median(listing):.2f} s"
              f" (min {min(listing):.2f}, max {max(listing):.2f})")
        print(f"  the same when a policy selects by metadata (every domain's XML read):"
              f" {statistics.median(listing_xml):.2f} s (min {min(listing_xml):.2f}, max {max(listing_xml):.2f})")
        print(f"  midnight tick ({started} slots due, jobs created and sent): {statistics.median(midnight):.2f} s"
              f" = {started / statistics.median(midnight):.0f} slots/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
