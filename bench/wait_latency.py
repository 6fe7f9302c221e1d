"""``python -m bench.wait_latency``: how late ``--wait`` sees a job's end.

A real catalog (SQLite in a temporary directory, or the PostgreSQL of ``--database``)
holds a job that a real claim takes; after a random 0.5-2.5 s of "work" a thread records
its end (``catalog.jobs.finish``, as a worker does) and notes the time; the waiter is
``virtwarden.submit.wait``, what ``--wait`` runs. The latency is from the commit of the
end to ``wait`` returning: with today's polling (every 0.05 s for the first 10 s, then
slowing to 0.2 s), with the polling before it (slowing from the start) and with the
fixed 1 s poll of earlier releases. Prints the median, p90 and max of
``--jobs`` waits for each, and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import inspect
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.wait_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20, help="waits measured for each polling (default 20)")
    p.add_argument("--database", help="a PostgreSQL URL (default: SQLite in a temporary directory)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def latencies(url: str, n: int, rng: random.Random, poll: float, poll_max: float, steady: float
              ) -> list[float]:
    from virtwarden.catalog import jobs
    from virtwarden.catalog.store import Catalog

    from virtwarden.submit import wait

    cat = Catalog(url)
    out = []
    try:
        for _ in range(n):
            job = jobs.create(cat, kind="backup", domain="bench01", host="local", params={})
            claim = jobs.claim(cat, job.id, "bench", 600, lock_domain=False)
            assert claim.fence is not None, claim
            ended: list[float] = []

            def work(fence=claim.fence, ended=ended) -> None:
                time.sleep(rng.uniform(0.5, 2.5))
                jobs.finish(cat, fence, ok=True, result={})
                ended.append(time.monotonic())

            worker = threading.Thread(target=work)
            worker.start()
            wait(cat, job.id, poll=poll, poll_max=poll_max, steady=steady)
            returned = time.monotonic()
            worker.join()
            out.append(returned - ended[0])
    finally:
        cat.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from virtwarden.submit import wait

    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vw-bench-wait-") as tmp:
        url = args.database or f"sqlite:///{tmp}/catalog.db"
        print(f"{args.jobs} jobs each, ended after 0.5-2.5 s of work; catalog: "
              f"{'PostgreSQL' if args.database else 'SQLite'}")
        medians = {}
        defaults = inspect.signature(wait).parameters  # today's polling, as --wait runs it
        poll, poll_max, steady = (defaults[k].default for k in ("poll", "poll_max", "steady"))
        pollings = [(f"now: {poll:g} s polls for {steady:g} s, up to {poll_max:g} s", poll, poll_max, steady),
                    (f"slowing from the start to {poll_max:g} s", poll, poll_max, 0.0),
                    ("before: 1 s polls", 1.0, 1.0, 0.0)]
        for name, poll, poll_max, steady in pollings:
            found = sorted(latencies(url, args.jobs, rng, poll, poll_max, steady))
            medians[name] = statistics.median(found)
            p90 = found[min(len(found) - 1, int(0.9 * len(found)))]
            print(f"  {name:42} median {medians[name] * 1000:6.0f} ms   p90 {p90 * 1000:6.0f} ms   "
                  f"max {found[-1] * 1000:6.0f} ms")
        now, slowing, before = (medians[name] for name, *_ in pollings)
        print(f"  ratio of the medians: {slowing / now:.1f}x the polling slowing from the start, "
              f"{before / now:.1f}x the 1 s poll")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
