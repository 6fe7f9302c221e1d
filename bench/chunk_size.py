"""``python -m bench.chunk_size``: the format-2 chunk size, chosen by measurement.

For each candidate size, on a real local-directory repository (encrypted, zstd), with
the real ``write_disk`` and ``read_disk``:

1. a full backup of a raw disk of --disk-mib holding random data: throughput;
2. --dirty-mib rewritten in 1 MiB pieces at random 4 KiB-aligned offsets (as
   bench/guest.py dirties a guest: each piece in a slot of its own), then an
   incremental (only the touched chunks read): stored bytes against dirtied bytes;
3. a restore of the last point into a sparse file: throughput;

and what the size costs in objects per GiB and index bytes per GiB. Prints a table
(docs/repository-format.md, "Chunk size", shows one).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.store import ChunkStore, read_disk, write_disk
from virtwarden.storage_backends.nfs import NfsBackend

from virtwarden.config import NfsStorage

MiB = 1024 * 1024
GiB = 1024 * MiB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chunk_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--disk-mib", type=int, default=1024, help="disk size, all of it random data (default 1024)")
    p.add_argument("--dirty-mib", type=int, default=128, help="rewritten in 1 MiB pieces (default 128)")
    p.add_argument("--sizes-kib", default="256,512,1024,2048,4096,8192", help="chunk sizes to measure, in KiB")
    p.add_argument("--workers", type=int, default=4, help="threads of write_disk/read_disk (default 4)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) * 1024 for s in args.sizes_kib.split(",")]
    root = Path(tempfile.mkdtemp(prefix="vw-chunk-bench-", dir=args.workdir))
    try:
        disk = root / "disk.raw"
        with open(disk, "wb") as f:
            for _ in range(args.disk_mib):
                f.write(os.urandom(MiB))
        rng = random.Random(args.seed)
        slot = MiB + 64 * 1024  # a piece and a qcow2 cluster: no two pieces share a cluster
        slots = sorted(rng.sample(range(args.disk_mib * MiB // slot), args.dirty_mib))
        pieces = [i * slot + rng.randrange(0, 64 * 1024, 4096) for i in slots]
        print(f"disk {args.disk_mib} MiB of random data; {args.dirty_mib} MiB rewritten in 1 MiB pieces at "
              f"random 4 KiB-aligned offsets; {args.workers} workers; encrypted, zstd")
        print(f"{'chunk':>8} {'full MB/s':>10} {'incr stored/dirtied':>20} {'incr s':>7} {'restore MB/s':>13} "
              f"{'objects/GiB':>12} {'index/GiB':>10}")
        for size in sizes:
            row = measure(root, disk, args.disk_mib * MiB, size, pieces, args.workers)
            print(f"{size // 1024:>6}Ki {row['full']:>10.0f} {row['ratio']:>20.2f} {row['incr_s']:>7.2f} "
                  f"{row['restore']:>13.0f} {GiB // size:>12} {32 * (GiB // size) // 1024:>8}Ki")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def measure(root: Path, disk: Path, size: int, chunk: int, pieces: list[int], workers: int) -> dict:
    repo_dir = root / f"repo-{chunk}"
    repo_dir.mkdir()
    store = ChunkStore(NfsBackend("bench", NfsStorage(type="nfs", path=str(repo_dir))), Codec(RepositoryKey.generate()))
    work = root / "work.raw"
    shutil.copyfile(disk, work)
    fd = os.open(work, os.O_RDWR)
    try:
        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        t = time.monotonic()
        first, _ = write_disk(store, "vda", read_at, size, chunk, workers=workers)
        full = size / MiB / (time.monotonic() - t)
        for offset in pieces:
            os.pwrite(fd, os.urandom(MiB), offset)
        changed = [(offset, MiB) for offset in pieces]
        t = time.monotonic()
        second, stats = write_disk(store, "vda", read_at, size, chunk, previous=first, changed=changed,
                                   workers=workers)
        incr_s = time.monotonic() - t
        out = root / "restored.raw"
        with open(out, "wb") as f:
            f.truncate(size)
            t = time.monotonic()
            read_disk(store, second, lambda offset, data: os.pwrite(f.fileno(), data, offset), workers=workers)
            os.fsync(f.fileno())
            restore = size / MiB / (time.monotonic() - t)
        out.unlink()
    finally:
        os.close(fd)
        work.unlink()
        shutil.rmtree(repo_dir)
    return {"full": full, "ratio": stats.stored_bytes / (len(pieces) * MiB), "incr_s": incr_s, "restore": restore}


if __name__ == "__main__":
    raise SystemExit(main())
