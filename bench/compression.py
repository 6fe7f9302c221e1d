"""``python -m bench.compression``: what format 2 stores of compressible data, and what
judging compressibility from samples costs and saves.

Two disks of --mib each, as raw files: one holding a tar of --source (``/usr/lib`` by
default: binaries, libraries, text; cut at the disk's size), one of random data. Each is
backed up whole (every chunk read, as a first full reads a disk holding data) with the
real ``write_disk`` into a fresh local-directory repository (encrypted, zstd, 512 KiB
chunks, 4 threads), page cache dropped first (when permitted), twice: with the
sampling of ``Codec`` (the default: an object whose samples do not compress is stored
raw without a whole attempt) and with every chunk compressed whole. Prints, for each,
the bytes stored against the disk's data, the time and the CPU time it took (user and
system, all threads); ``--repeat`` runs alternate the
two ways and report medians.

The issue's goal: compressible data (a tar of /usr/lib written into the guest) stored at
most 0.45x. The bytes are the same whether a guest wrote them or this bench did, chunk
for chunk: what a guest's filesystem adds (block layout, metadata) is not measured here.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.store import ChunkStore, write_disk
from virtwarden.storage_backends.nfs import NfsBackend

from bench.host import drop_caches
from virtwarden.config import NfsStorage

MiB = 1024 * 1024
CHUNK = 512 * 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path("/usr/lib"), help="what the tar holds (default /usr/lib)")
    p.add_argument("--mib", type=int, default=1024, help="size of each disk (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each way; medians are reported (default 3)")
    p.add_argument("--workers", type=int, default=4, help="threads of write_disk (default 4)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.mib * MiB
    root = Path(tempfile.mkdtemp(prefix="vw-compression-bench-", dir=args.workdir))
    try:
        disks = {"tar of " + str(args.source): _tar_disk(root / "tar.raw", args.source, size),
                 "random": _random_disk(root / "random.raw", size)}
        key = RepositoryKey.generate()
        print(f"disks of {args.mib} MiB; 512 KiB chunks, zstd level 3, AES-256-GCM, {args.workers} threads; "
              f"page cache dropped: {'yes' if drop_caches() else 'no (not permitted)'}")
        print(f"{'disk':<24} {'compression':<20} {'stored / data':>14} {'seconds':>8} {'MB/s':>7} {'CPU s':>8}")
        for name, (disk, data) in disks.items():
            runs: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
            for _ in range(args.repeat):
                for sampling in (True, False):
                    runs[sampling].append(_backup(root, disk, size, key, sampling, args.workers))
            for sampling in (True, False):
                seconds = statistics.median(t for t, _, _ in runs[sampling])
                cpu = statistics.median(c for _, c, _ in runs[sampling])
                stored = runs[sampling][0][2]
                print(f"{name[:24]:<24} {'sampled first' if sampling else 'every chunk whole':<20} "
                      f"{stored / data:>14.3f} {seconds:>8.2f} {data / 1e6 / seconds:>7.0f} {cpu:>8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _tar_disk(path: Path, source: Path, size: int) -> tuple[Path, int]:
    """A raw disk of ``size`` bytes starting with a tar of ``source``; the bytes of tar."""
    with open(path, "wb") as f:
        tar = subprocess.Popen(["tar", "-cf", "-", "--sort=name", "--ignore-failed-read", "-C", str(source.parent),
                                source.name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert tar.stdout is not None
        written = 0
        while written < size:
            block = tar.stdout.read(min(MiB, size - written))
            if not block:
                break
            f.write(block)
            written += len(block)
        tar.kill()
        tar.wait()
        f.truncate(size)
    return path, written


def _random_disk(path: Path, size: int) -> tuple[Path, int]:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path, size


def _backup(root: Path, disk: Path, size: int, key: RepositoryKey, sampling: bool, workers: int
            ) -> tuple[float, float, int]:
    """One full of ``disk`` into a fresh repository: (seconds, CPU seconds of this
    process, user and system, bytes stored)."""
    repo = root / "repo"
    repo.mkdir()
    store = ChunkStore(NfsBackend("bench", NfsStorage(type="nfs", path=str(repo))), Codec(key, sampling=sampling))
    fd = os.open(disk, os.O_RDONLY)
    try:
        drop_caches()
        t, cpu = time.monotonic(), _cpu()
        _index, stats = write_disk(store, "vda", lambda offset, length: os.pread(fd, length, offset), size, CHUNK,
                                   workers=workers)
        return time.monotonic() - t, _cpu() - cpu, stats.stored_bytes
    finally:
        os.close(fd)
        shutil.rmtree(repo)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
