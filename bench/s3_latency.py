"""``python -m bench.s3_latency``: format-2 chunks to and from S3 when every request
waits a round trip, as it does to a real object store.

The S3 endpoint of the test host (moto) answers on this machine at once; a real one
does not. Here every byte between the client and the endpoint goes through a proxy
that delivers it --rtt-ms / 2 later in each direction (bandwidth unchanged), and a disk
of --mib of random data is, --repeat times, for each number of chunks at a time:

- ``store``: backed up with the real ``write_disk`` (512 KiB chunks, zstd, AES-256-GCM)
  into a fresh repository prefix;
- ``restore``: served from those chunks over NBD (``ChunkExport``) to ``qemu-img
  convert``, as a restore job does, with qemu-img's requests in flight matching (its
  default 8 for 4 chunks at a time, as before ``chunk_concurrency``; 16 otherwise).

Both with the proxy's delay and without it (0 ms: the endpoint's own pace). Prints
medians [min-max] of seconds and MiB/s; removes its objects.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from virtwarden.hypervisor import qemu_img
from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.nbd import ChunkExport
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.store import ChunkStore, write_disk
from virtwarden.storage_backends.s3 import S3Backend

from bench.stats import Series, spread
from virtwarden.config import S3Storage

MiB = 1024 * 1024
CHUNK = 512 * 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.s3_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="random data in the disk (default 256)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the proxy adds (default 20)")
    p.add_argument("--concurrency", default="4,16", help="chunks at a time to compare (default 4,16)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each (default 2)")
    p.add_argument("--endpoint", default=os.environ.get("VIRTWARDEN_TEST_S3_ENDPOINT", "http://127.0.0.1:9900"))
    p.add_argument("--bucket", default="virtwarden-bench-latency")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    return p.parse_args(argv)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delivers what it reads ``delay`` seconds later, in
    order, in each direction: a round trip of ``2 * delay`` on every request, and a bulk
    transfer slowed by one delay, not one per piece."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                if (wait := at + self.delay - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        while True:
            data = await reader.read(MiB)
            await queue.put((time.monotonic(), data))
            if not data:
                break
        await sender


def _backend(endpoint: str, bucket: str, prefix: str, concurrency: int = 4) -> S3Backend:
    return S3Backend("bench", S3Storage(type="s3", bucket=bucket, prefix=prefix, endpoint_url=endpoint,
                                        region="us-east-1", access_key_id="bench", secret_access_key="bench",
                                        chunk_concurrency=concurrency))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host, port = args.endpoint.split("//", 1)[1].rsplit(":", 1)
    proxy = DelayProxy((host, int(port)), args.rtt_ms / 2000)
    endpoints = {f"{args.rtt_ms:g} ms": f"http://127.0.0.1:{proxy.port}", "0 ms": args.endpoint}
    levels = [int(n) for n in args.concurrency.split(",")]
    key = RepositoryKey.generate()
    size = args.mib * MiB
    data = os.urandom(size)
    results: dict[tuple[str, int, str], Series] = {}
    prefixes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="virtwarden-s3lat-", dir=args.workdir))
    with contextlib.suppress(Exception):  # it exists from an earlier run
        _backend(args.endpoint, args.bucket, "")._client().create_bucket(Bucket=args.bucket)
    try:
        for _ in range(args.repeat):
            for link, endpoint in endpoints.items():
                for n in levels:
                    prefix = f"run-{uuid.uuid4()}"
                    prefixes.append(prefix)
                    store = ChunkStore(_backend(endpoint, args.bucket, prefix, n), Codec(key))
                    started = time.monotonic()
                    index, _ = write_disk(store, "vda", lambda o, length: data[o:o + length], size, CHUNK)
                    results.setdefault((link, n, "store"), Series("s")).add(time.monotonic() - started)
                    out = work / "out.qcow2"
                    started = time.monotonic()
                    with ChunkExport(store, index, work) as export:
                        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        try:
                            # qemu_img.flatten_into with qemu-img's default for the 4 of before
                            inflight = ["-m", "16"] if n > 4 else []
                            subprocess.run(["qemu-img", "convert", *inflight, "-O", "qcow2",
                                            qemu_img._chain([qemu_img.NbdDisk(export.socket, export.fd)]),
                                            f"/proc/self/fd/{fd}"], check=True, pass_fds=(fd, export.fd))
                        finally:
                            os.close(fd)
                    results.setdefault((link, n, "restore"), Series("s")).add(time.monotonic() - started)
                    out.unlink()
                    print(f"{link:>7s}, {n:2d} at a time: stored and restored", flush=True)
        print(f"\n{args.mib} MiB of random data in 512 KiB chunks; medians of {args.repeat} [min-max]")
        print(f"{'round trip':>10s} {'at a time':>9s} {'store s':>18s} {'MiB/s':>6s} {'restore s':>18s} {'MiB/s':>6s}")
        for link in endpoints:
            for n in levels:
                st, rs = results[(link, n, "store")], results[(link, n, "restore")]
                print(f"{link:>10s} {n:9d} {spread(st):>18s} {args.mib / st.median:6.0f} "
                      f"{spread(rs):>18s} {args.mib / rs.median:6.0f}")
        for link in endpoints:
            lo, hi = levels[0], levels[-1]
            print(f"{link}: {hi} at a time / {lo}: store "
                  f"{results[(link, hi, 'store')].median / results[(link, lo, 'store')].median:.2f}x the time, "
                  f"restore {results[(link, hi, 'restore')].median / results[(link, lo, 'restore')].median:.2f}x")
    finally:
        for prefix in prefixes:
            backend = _backend(args.endpoint, args.bucket, prefix)
            for info in list(backend.list("")):
                backend.delete(info.key)
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
