"""``python -m bench.listener``: how fast the listener records a burst of events.

A real ``Listener`` (no host connections) is given ``--events`` live events at once, as a
burst of libvirt callbacks would queue them: ``domain.started`` of ``--domains`` domains
that no policy triggers on, so each costs what recording it costs (the event row, the
domain's row). Measured from the dispatcher's start until every event is recorded, with
the events handled one at a time (``BATCH`` 1, as before batching) and in batches
(``listener.BATCH``), on a SQLite catalog or the PostgreSQL of ``--database``. Prints
events per second and the ratio.

``--trigger``: the same burst, but each event is ``domain.started`` of a running domain
(on libvirt's test driver, ``test:///…/node.xml``) that a policy backs up on that event
(``on: domain.started -> backup``, selected by name, so no metadata is read): the
listener records the event, creates the job and sends its message to the Redis of
``--broker`` (a database it flushes). Prints events per second until
every job exists, and each event's latency from its arrival to its job's creation
(median, p99, max).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.listener", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=5000, help="events in the burst (default 5000)")
    p.add_argument("--domains", type=int, default=1000, help="domains they are about (default 1000)")
    p.add_argument("--runs", type=int, default=3, help="runs of each (median printed; default 3)")
    p.add_argument("--database", help="a PostgreSQL URL whose catalog tables may be emptied (default: SQLite)")
    p.add_argument("--trigger", action="store_true", help="events that start a backup each (see above)")
    p.add_argument("--broker", default="redis://127.0.0.1:6379/9", help="with --trigger: a Redis database it may flush")
    return p.parse_args(argv)


TRIGGER_POLICY = """\
apiVersion: virtwarden/v1
kind: Policy
metadata: {name: on-start}
spec:
  selector: {domains: ["*"]}
  backup: {target: nfs}
  on:
    - {event: domain.started, run: backup}
"""


def _drained(listener) -> float:
    """Start the listener on the events queued for it; seconds until it has handled them."""
    began = time.perf_counter()
    listener.start()
    while listener.backlog()[0]:
        time.sleep(0.01)
    return time.perf_counter() - began


def trigger_run(root: Path, args: argparse.Namespace) -> tuple[float, list[float]]:
    """One burst of triggering events: events per second until every job exists, and
    each event's latency (arrival to its job's creation), in seconds."""
    import redis
    from virtwarden.catalog.models import Base, Event, Job
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent
    from virtwarden.policies.loader import SETTLE_SECONDS
    from virtwarden.worker import celery_app

    from bench.fleet import fleet
    from virtwarden.config import load
    from virtwarden.daemons.listener import Listener

    (root / "policies").mkdir(exist_ok=True)
    (root / "policies" / "on-start.yaml").write_text(TRIGGER_POLICY)
    # A policy file changed less than policies.loader.SETTLE_SECONDS ago is read again at
    # every look: the burst comes after it settled, as on a fleet whose policies were not
    # being edited.
    settled = time.monotonic() + SETTLE_SECONDS + 0.1
    hosts = fleet(root, 1, args.domains)  # host h000: domains h000-vm000 ...
    (root / "store").mkdir(exist_ok=True)
    doc = {"data_dir": str(root / "data"), "policy_dir": str(root / "policies"), "hosts": hosts,
           "broker_url": args.broker, "storage": {"nfs": {"type": "nfs", "path": str(root / "store")}}}
    if args.database:
        doc["database_url"] = args.database
    cfg_file = root / "virtwarden.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    cfg_file.chmod(0o600)
    cfg = load(str(cfg_file), env={})
    redis.Redis.from_url(args.broker).flushdb()
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    with cat.session() as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())
    ids = [str(uuid.uuid4()) for _ in range(args.domains)]
    listener = Listener(cfg, cat, [], backoff_min=1, backoff_max=1)
    time.sleep(max(0.0, settled - time.monotonic()))
    arrived = time.time()
    for i in range(args.events):
        d = i % args.domains
        listener.queue.put(HostEvent("h000", f"h000-vm{d:03d}", ids[d], "domain.started", "booted", arrived))
    try:
        took = _drained(listener)
        with cat.session() as s:
            created = [j.created_at.timestamp() for j in s.query(Job)]
            assert s.query(Event).count() == args.events
    finally:
        listener.stop()
        cat.close()
        redis.Redis.from_url(args.broker).flushdb()
    assert len(created) == args.events, f"{len(created)} jobs for {args.events} events"
    return args.events / took, [c - arrived for c in created]


def trigger_main(args: argparse.Namespace) -> int:
    where = "PostgreSQL" if args.database else "SQLite"
    print(f"{args.events} domain.started events of {args.domains} running domains, each starting a backup, "
          f"{where} catalog, median of {args.runs}")
    rates, p50, p99, worst = [], [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vw-bench-listener-") as tmp:
            rate, latencies = trigger_run(Path(tmp), args)
        latencies.sort()
        rates.append(rate)
        p50.append(latencies[len(latencies) // 2])
        p99.append(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])
        worst.append(latencies[-1])
    print(f"  {statistics.median(rates):8.0f} events/s  (runs: {', '.join(f'{r:.0f}' for r in rates)})")
    print(f"  event -> job: median {statistics.median(p50):.2f} s, p99 {statistics.median(p99):.2f} s, "
          f"max {statistics.median(worst):.2f} s")
    return 0


def one_run(root: Path, database: str | None, n_events: int, n_domains: int, batch: int) -> float:
    from sqlalchemy import delete
    from virtwarden.catalog import events
    from virtwarden.catalog.models import Domain, Event
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent

    from virtwarden.config import load
    from virtwarden.daemons import listener as module

    (root / "policies").mkdir(exist_ok=True)
    cfg_file = root / "virtwarden.yaml"
    doc = {"data_dir": str(root / "data"), "policy_dir": str(root / "policies"),
           "hosts": {"h": {"uri": "test:///default"}}}
    if database:
        doc["database_url"] = database
    cfg_file.write_text(yaml.safe_dump(doc))
    cfg = load(str(cfg_file), env={})
    cat = Catalog(cfg.catalog_url)
    with cat.session() as s:
        s.execute(delete(Event))
        s.execute(delete(Domain))
    ids = [str(uuid.uuid4()) for _ in range(n_domains)]
    saved, module.BATCH = module.BATCH, batch
    listener = module.Listener(cfg, cat, [], backoff_min=1, backoff_max=1)
    now = time.time()
    for i in range(n_events):
        d = i % n_domains
        listener.queue.put(HostEvent("h", f"vm{d:05d}", ids[d], "domain.started", "booted", now))
    try:
        took = _drained(listener)
        assert len(events.recent(cat, limit=n_events + 1)) == n_events
    finally:
        listener.stop()
        module.BATCH = saved
        cat.close()
    return n_events / took


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from virtwarden.daemons import listener as module

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.trigger:
        return trigger_main(args)
    where = "PostgreSQL" if args.database else "SQLite"
    print(f"{args.events} events of {args.domains} domains that start no job, {where} catalog, "
          f"median of {args.runs}")
    rates = {}
    for batch in (1, module.BATCH):
        with tempfile.TemporaryDirectory(prefix="vw-bench-listener-") as tmp:
            runs = [one_run(Path(tmp), args.database, args.events, args.domains, batch) for _ in range(args.runs)]
        rates[batch] = statistics.median(runs)
        print(f"  batch {batch:>4}: {rates[batch]:8.0f} events/s  (runs: {', '.join(f'{r:.0f}' for r in runs)})")
    print(f"  ratio: {rates[module.BATCH] / rates[1]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
