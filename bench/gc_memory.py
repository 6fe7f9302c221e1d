"""``python -m bench.gc_memory``: a format-2 gc's memory, and ``storage stats``', against
the number of chunks.

For each --chunks N, a fresh local-directory repository (encrypted, 4 KiB chunks so that
many chunks cost little disk) gets two points of N/2 distinct chunks each, written by the
real ``write_disk``; the first point is deleted, then ``Format2Repository.gc`` runs in a
process of its own (listing N chunks, reading the remaining index, deleting N/2). Its
peak resident memory (``VmHWM``) is compared with that of the same process opening
the repository without collecting: the difference is what the gc holds. Prints, per N,
the seconds, the peaks, bytes per stored chunk, and the ratio to the previous N (the
issue's goal: gc memory proportional to the number of chunks, i.e. the extra memory
doubles when N does, no faster). The same for ``Format2Repository.usage`` (what
``virtwarden storage stats`` shows), run on the same repository before the gc.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.repository import Format2Repository
from virtwarden.storage_backends.format2.store import write_disk
from virtwarden.storage_backends.nfs import NfsBackend

from virtwarden.config import NfsStorage

CHUNK = 4096
REPO_ROOT = Path(__file__).resolve().parent.parent

# Run in a process of its own: open the repository, gc unless told not to, report.
CHILD = """
import json, sys, time
from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.repository import Format2Repository
from virtwarden.storage_backends.nfs import NfsBackend
from virtwarden.config import NfsStorage
path, key_doc, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
key = RepositoryKey(key_doc["repository"], bytes.fromhex(key_doc["encryption"]), bytes.fromhex(key_doc["ids"]))
repo = Format2Repository(NfsBackend("bench", NfsStorage(type="nfs", path=path)), Codec(key))
repo.config
t = time.monotonic()
report = repo.gc() if mode == "gc" else None
usage = repo.usage() if mode == "stats" else None
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.monotonic() - t, "peak_kib": hwm,
                  "deleted": report.deleted if report else 0,
                  "chunks": report.chunks if report else usage.chunks_stored if usage else 0}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gc_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", default="40000,80000,160000",
                   help="stored chunks per run (default 40000,80000,160000)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.chunks.split(",")]
    key = RepositoryKey.generate()
    key_doc = json.dumps({"repository": key.repository, "encryption": key.encryption.hex(), "ids": key.ids.hex()})
    print(f"{'chunks':>8} {'deleted':>8} {'gc s':>6} {'peak MiB':>9} {'base MiB':>9} {'gc MiB':>7} "
          f"{'B/chunk':>8} {'x prev':>7}   {'stats s':>7} {'stats MiB':>9} {'B/chunk':>8}")
    previous = None
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="vw-gc-bench-", dir=args.workdir))
        try:
            _fill(root, key, n)
            base = _child(root, key_doc, "open")
            stats = _child(root, key_doc, "stats")
            if stats["chunks"] != n:
                raise RuntimeError(f"usage counted {stats['chunks']} stored chunks; expected {n}")
            run = _child(root, key_doc, "gc")
            if run["chunks"] != n or run["deleted"] != n // 2:
                raise RuntimeError(f"gc saw {run['chunks']} chunks and deleted {run['deleted']}; "
                                   f"expected {n} and {n // 2}")
            extra = (run["peak_kib"] - base["peak_kib"]) * 1024
            stats_extra = (stats["peak_kib"] - base["peak_kib"]) * 1024
            grew = f"{extra / previous:.2f}" if previous else "-"
            print(f"{n:>8} {run['deleted']:>8} {run['seconds']:>6.1f} {run['peak_kib'] / 1024:>9.1f} "
                  f"{base['peak_kib'] / 1024:>9.1f} {extra / 2**20:>7.1f} {extra / n:>8.0f} {grew:>7}   "
                  f"{stats['seconds']:>7.1f} {stats_extra / 2**20:>9.1f} {stats_extra / n:>8.0f}")
            previous = extra
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _fill(root: Path, key: RepositoryKey, n: int) -> None:
    """Two points of n/2 distinct random chunks each; the first one deleted."""
    repo = Format2Repository.init(NfsBackend("bench", NfsStorage(type="nfs", path=str(root))), Codec(key),
                                  chunk_size=CHUNK)
    half = n // 2
    refs = []
    for _ in range(2):
        index, stats = write_disk(repo.chunks, "vda", lambda _offset, length: os.urandom(length), half * CHUNK, CHUNK)
        assert stats.stored_chunks == half
        ref = repo.ref("bench", str(uuid.uuid4()))
        sha = repo.write_index(ref, index)
        repo.write_manifest(ref, {"format": 2, "domain": {"name": "bench"},
                                  "disks": [{"target": "vda", "index_sha256": sha}]})
        refs.append(ref)
    repo.delete_point(refs[0])


def _child(root: Path, key_doc: str, mode: str) -> dict:
    """``mode``: open (the repository only), stats (``usage``) or gc."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), key_doc, mode],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
