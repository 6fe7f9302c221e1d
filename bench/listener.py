"""``python -m bench.listener``: how fast the listener records a burst of events.

A real ``Listener`` (no host connections) is given ``--events`` live events at once, as a
burst of libvirt callbacks would queue them: ``domain.started`` of ``--domains`` domains
that no policy triggers on, so each costs what recording it costs (the event row, the
domain's row). Measured from the dispatcher's start until every event is recorded, with
the events handled one at a time (``BATCH`` 1, as before batching) and in batches
(``listener.BATCH``), on a SQLite catalog or the PostgreSQL of ``--database``. Prints
events per second and the ratio.
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
    return p.parse_args(argv)


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
        began = time.perf_counter()
        listener.start()
        while listener.backlog()[0]:
            time.sleep(0.01)
        took = time.perf_counter() - began
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
