"""``python -m bench.fetch``: what it costs a restore to use only bytes it hashed.

One qcow2 artifact with --data-gib of random data on a local-directory target, then,
--repeat times, alternating, with the page cache dropped before each:

- ``in place``: the artifact's SHA-256 checked in place, then ``qemu-img convert`` of
  the stored file (how restores worked before: the convert read unhashed bytes);
- ``copy``: ``NfsBackend.get_file`` into scratch, hashing the bytes it writes, then
  ``qemu-img convert`` of that copy (``tasks.restore.fetch`` and ``rebuild``).

Both end with an fsync of the rebuilt image. Prints medians [min-max]; removes its files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from virtwarden.hypervisor import qemu_img
from virtwarden.storage_backends import _stream
from virtwarden.storage_backends.nfs import NfsBackend

from bench.stats import Series, spread
from virtwarden.config import NfsStorage

MiB = 1024 * 1024
KEY = "dom/chain/point/vda.qcow2"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-gib", type=float, default=1.0, help="random data in the artifact (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each way (default 5)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    return p.parse_args(argv)


def make_artifact(root: Path, data_bytes: int) -> Path:
    raw, art = root / "data.raw", root / "repo" / KEY
    art.parent.mkdir(parents=True)
    with open(raw, "wb") as f:
        for _ in range(0, data_bytes, 4 * MiB):
            f.write(os.urandom(4 * MiB))
        f.truncate(2 * data_bytes)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(art)], check=True)
    raw.unlink()
    return art


def drop_caches() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)


def rebuild(layer: Path, out: Path) -> None:
    qemu_img.flatten([layer], out)
    with open(out, "rb+") as f:
        os.fsync(f.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="virtwarden-fetch-", dir=args.workdir))
    try:
        art = make_artifact(root, int(args.data_gib * 1024 * MiB))
        sha = _stream.hash_file(art)[1]
        backend = NfsBackend("bench", NfsStorage(type="nfs", path=str(root / "repo")))
        out, scratch = root / "out.qcow2", root / "scratch"

        def in_place() -> None:
            backend.verify(KEY, sha)
            rebuild(art, out)

        def copy() -> None:
            scratch.mkdir()
            backend.get_file(KEY, scratch / "vda.qcow2", expected_sha256=sha, durable=False)
            rebuild(scratch / "vda.qcow2", out)
            shutil.rmtree(scratch)

        ways: dict[str, tuple[Callable[[], None], Series]] = {
            "in place": (in_place, Series("s")), "copy": (copy, Series("s"))}
        for i in range(args.repeat):
            for fn, series in ways.values():
                out.unlink(missing_ok=True)
                drop_caches()
                started = time.monotonic()
                fn()
                series.add(time.monotonic() - started)
            print(f"repeat {i + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"artifact {art.stat().st_size / 2**30:.2f} GiB ({args.data_gib:g} GiB of random data), "
              f"fetch + rebuild, medians of {args.repeat} [min-max], seconds")
        for name, (_, series) in ways.items():
            print(f"{name:10s} {spread(series)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
