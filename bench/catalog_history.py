"""``python -m bench.catalog_history``: the catalog queries of every scheduler tick and of
``virtwarden jobs`` over a long history, with and without their indexes.

Fills an SQLite catalog (or the PostgreSQL of ``--database``, whose tables it empties)
with ``--days`` nights of a ``--domains`` fleet: a started slot, a succeeded job and a
complete restore point per domain and night, plus a handful of deferred slots, then
times (median of ``--runs``) what the operator's reads cost (a metrics scrape, a
domain's points and jobs), and what
each tick asks (deferred slots; started slots without a job) and what ``virtwarden jobs``
asks (the 30 newest jobs) and a metrics scrape, with the indexes of migrations 0012 and
0014, and again without them;
then what the history retention costs: the sweeper pruning the oldest night (a day's
worth of jobs and slots) in its batches.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

START = datetime(2026, 11, 1, tzinfo=UTC)  # the first night
# The indexes of migrations 0012, 0014 and 0017 that the measured reads take.
INDEXES = {"ix_schedule_slots_state_job_id": "schedule_slots (state, job_id)",
           "ix_jobs_created_at": "jobs (created_at)",
           "ix_jobs_kind_state": "jobs (kind, state)",
           "ix_restore_points_status_domain_created_at": "restore_points (status, domain, created_at)",
           "ix_restore_points_status_storage_size": "restore_points (status, storage, format, size_bytes)"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.catalog_history", description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=20_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--database", help="a PostgreSQL URL whose catalog tables may be emptied (default: SQLite)")
    return p.parse_args(argv)


def fill(cat, domains: int, days: int) -> None:
    from sqlalchemy import insert
    from virtwarden.catalog.models import Job, RestorePoint, ScheduleSlot

    start = START
    with cat.engine.begin() as conn:
        for day in range(days):
            night = start + timedelta(days=day)
            jobs, slots, points = [], [], []
            for d in range(domains):
                job_id = str(uuid.uuid4())
                points.append({"id": str(uuid.uuid4()), "domain": f"vm{d:05d}", "domain_uuid": f"u{d:05d}",
                               "host": f"h{d % 500:03d}", "storage": "nfs", "strategy": "bitmap", "chain_id": f"c{d}",
                               "seq": day, "level": "incremental" if day else "full", "status": "complete",
                               "consistency": "crash", "manifest_key": f"vm{d:05d}/{day}/manifest.json", "format": 2,
                               "size_bytes": 1 << 30, "job_id": job_id, "created_at": night, "completed_at": night})
                jobs.append({"id": job_id, "kind": "backup", "state": "succeeded", "domain": f"vm{d:05d}",
                             "host": f"h{d % 500:03d}", "params": {}, "created_at": night, "finished_at": night,
                             "attempts": 1, "max_attempts": 3, "fence": 1, "sends": 1, "progress": 1.0})
                slots.append({"policy": "nightly", "job": "backup", "domain": f"vm{d:05d}", "slot_at": night,
                              "window_end": night + timedelta(hours=6), "state": "started", "job_id": job_id})
            conn.execute(insert(Job), jobs)
            conn.execute(insert(ScheduleSlot), slots)
            conn.execute(insert(RestorePoint), points)
        conn.execute(insert(ScheduleSlot), [
            {"policy": "nightly", "job": "backup", "domain": f"late{d}", "slot_at": start + timedelta(days=days),
             "window_end": start + timedelta(days=days, hours=6), "state": "deferred"} for d in range(5)])


def timed(fn: Callable[[], object], runs: int) -> float:
    took = []
    for _ in range(runs):
        begin = time.perf_counter()
        fn()
        took.append(time.perf_counter() - begin)
    return statistics.median(took)


def measure(cat, runs: int) -> dict[str, float]:
    from prometheus_client.registry import CollectorRegistry
    from virtwarden.catalog import jobs, slots

    from virtwarden.api.metrics import CatalogCollector

    registry = CollectorRegistry()
    registry.register(CatalogCollector(cat))
    return {"a metrics scrape (the catalog's families)": timed(lambda: list(registry.collect()), runs),
            "deferred slots (each tick)": timed(lambda: slots.deferred(cat), runs),
            "started slots without a job (each tick)": timed(lambda: slots.unsent(cat), runs),
            "the 30 newest jobs (virtwarden jobs)": timed(lambda: jobs.recent(cat, limit=30), runs)}


def prune_oldest_night(cat, domains: int) -> None:
    """The history retention's cut placed between the first night and the second: what
    the sweeper does once a day in a fleet this size, through the indexes on the jobs'
    creation time and the slots' instant."""
    from virtwarden.catalog.housekeeping import prune_rows

    keep = (datetime.now(UTC) - START).days  # the first night is older than that, the second younger
    begin = time.perf_counter()
    removed = prune_rows(cat, {"jobs": keep, "slots": keep})
    took = time.perf_counter() - begin
    print(f"  the oldest night pruned ({removed['jobs']} jobs, {removed['slots']} slots of {domains} domains):"
          f" {took:.2f} s in batches")


def measure_reads(cat, runs: int) -> dict[str, float]:
    from virtwarden.catalog import jobs, points

    return {"a domain's points (virtwarden backups DOMAIN)": timed(lambda: points.for_domain(cat, "vm00042"), runs),
            "a domain's 30 newest jobs (virtwarden jobs --domain)":
                timed(lambda: jobs.recent(cat, limit=30, domain="vm00042"), runs)}


def main(argv: Sequence[str] | None = None) -> int:
    from virtwarden.catalog.models import Base
    from virtwarden.catalog.store import Catalog

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vw-history-") as tmp:
        cat = Catalog(args.database or f"sqlite:///{Path(tmp) / 'catalog.db'}")
        with cat.session() as s:
            for table in reversed(Base.metadata.sorted_tables):
                s.execute(table.delete())
        begin = time.perf_counter()
        fill(cat, args.domains, args.days)
        print(f"catalog: {args.days} nights of {args.domains} domains ({args.days * args.domains} jobs, slots and"
              " points)"
              f" written in {time.perf_counter() - begin:.0f} s")
        for what, t in measure_reads(cat, args.runs).items():
            print(f"  {what}: {t * 1000:.1f} ms")
        with_index = measure(cat, args.runs)
        with cat.engine.begin() as conn:
            for name in INDEXES:
                conn.exec_driver_sql(f"DROP INDEX {name}")
        without = measure(cat, args.runs)
        for what, t in with_index.items():
            print(f"  {what}: {t * 1000:.1f} ms with the index, {without[what] * 1000:.1f} ms without"
                  f" ({without[what] / t:.1f}x)")
        with cat.engine.begin() as conn:  # back, as the migrations make them
            for name, made in INDEXES.items():
                conn.exec_driver_sql(f"CREATE INDEX {name} ON {made}")
        prune_oldest_night(cat, args.domains)
        cat.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
