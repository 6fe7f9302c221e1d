"""``python -m bench.chunk_writes``: how a format-2 full's chunks reach a directory
repository, against ``cp --sparse`` + fsync of the same data.

A raw disk of --mib of random data is backed up whole with the real ``write_disk``
(512 KiB chunks, zstd, AES-256-GCM, --workers threads) into a fresh local-directory
repository, --repeat times, alternating these ways of making the chunks durable:

- ``now``: what the product does: each chunk's writeback started as soon as it is
  written (``_stream.start_writeback``), one syncfs for the bytes and one for the names
  every ``_SyncedTogether.LIMIT`` chunks (16,384) and at the end;
- ``before``: how it was until 2026-12-07: no writeback started, the two syncs every
  1,024 chunks;
- ``no sync``: neither writeback nor syncs (the chunks not durable: what the rest of
  the work costs);

and ``cp --sparse=always`` of the disk + fsync of the copy. The page cache is dropped
before each, and the machine left alone for --settle seconds (on a virtual machine
whose freed memory goes back to its host, touching it again right away costs more).
Prints medians [min-max] of the wall time and of the CPU time (user, system) of this
process or of cp; removes its files.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from virtwarden.storage_backends import _stream
from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.store import ChunkStore, write_disk
from virtwarden.storage_backends.nfs import NfsBackend, _SyncedTogether

from bench.host import drop_caches
from bench.stats import Series, spread
from virtwarden.config import NfsStorage

MiB = 1024 * 1024
CHUNK = 512 * 1024
WAYS = ("now", "before", "no sync", "cp")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chunk_writes", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=2048, help="size of the disk, all random data (default 2048)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each way; medians are reported (default 3)")
    p.add_argument("--workers", type=int, default=4, help="threads of write_disk (default 4)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after dropping the page cache (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.mib * MiB
    root = Path(tempfile.mkdtemp(prefix="vw-chunk-writes-bench-", dir=args.workdir))
    try:
        disk = root / "disk.raw"
        with open(disk, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MiB))
        key = RepositoryKey.generate()
        wall = {w: Series("s") for w in WAYS}
        user = {w: Series("s") for w in WAYS}
        system = {w: Series("s") for w in WAYS}
        cached = drop_caches()
        print(f"a disk of {args.mib} MiB of random data; 512 KiB chunks, zstd, AES-256-GCM, {args.workers} threads; "
              f"page cache dropped: {'yes' if cached else 'no (not permitted)'}")
        for _ in range(args.repeat):
            for way in WAYS:
                drop_caches()
                time.sleep(args.settle)
                run = _cp if way == "cp" else _full
                seconds, u, s = run(root, disk, size, key, way, args.workers)
                wall[way].add(seconds)
                user[way].add(u)
                system[way].add(s)
        print(f"{'way':<10} {'seconds':>22} {'MB/s':>6} {'user CPU s':>20} {'system CPU s':>20}")
        for way in WAYS:
            print(f"{way:<10} {spread(wall[way]):>22} {size / 1e6 / wall[way].median:>6.0f} "
                  f"{spread(user[way]):>20} {spread(system[way]):>20}")
        print(f"ratio now / cp: {wall['now'].median / wall['cp'].median:.2f}; "
              f"before / cp: {wall['before'].median / wall['cp'].median:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _full(root: Path, disk: Path, size: int, key: RepositoryKey, way: str, workers: int
          ) -> tuple[float, float, float]:
    repo = root / "repo"
    repo.mkdir()
    store = ChunkStore(NfsBackend("bench", NfsStorage(type="nfs", path=str(repo), fsync=way != "no sync")),
                       Codec(key))
    fd = os.open(disk, os.O_RDONLY)
    try:
        with _as(way):
            start, cpu = time.monotonic(), _cpu(resource.RUSAGE_SELF)
            write_disk(store, "vda", lambda offset, length: os.pread(fd, length, offset), size, CHUNK,
                       workers=workers)
            seconds, after = time.monotonic() - start, _cpu(resource.RUSAGE_SELF)
        return seconds, after[0] - cpu[0], after[1] - cpu[1]
    finally:
        os.close(fd)
        shutil.rmtree(repo)


@contextmanager
def _as(way: str) -> Iterator[None]:
    """The product's code as it is (``now``), or as it was (``before``)."""
    if way != "before":
        yield
        return
    limit, writeback = _SyncedTogether.LIMIT, _stream.start_writeback
    _SyncedTogether.LIMIT = 1024
    setattr(_stream, "start_writeback", _no_writeback)  # noqa: B010 - mypy refuses assigning to a function
    try:
        yield
    finally:
        _SyncedTogether.LIMIT = limit
        setattr(_stream, "start_writeback", writeback)  # noqa: B010


def _no_writeback(_fd: int) -> None:
    pass


def _cp(root: Path, disk: Path, size: int, key: RepositoryKey, way: str, workers: int
        ) -> tuple[float, float, float]:
    copy = root / "copy.raw"
    start, cpu = time.monotonic(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(["cp", "--sparse=always", str(disk), str(copy)], check=True)
    fd = os.open(copy, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds, after = time.monotonic() - start, _cpu(resource.RUSAGE_CHILDREN)
    copy.unlink()
    return seconds, after[0] - cpu[0], after[1] - cpu[1]


def _cpu(who: int) -> tuple[float, float]:
    usage = resource.getrusage(who)
    return usage.ru_utime, usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
