"""qemu-img, the tool that reads and writes disk images, run as a subprocess."""
from __future__ import annotations

import bisect
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from virtwarden.errors import NoSpace, ToolFailed

QEMU_IMG = "qemu-img"


def _run(*args: str, pass_fds: tuple[int, ...] = ()) -> str:
    if shutil.which(QEMU_IMG) is None:
        raise ToolFailed("qemu-img is not installed (Debian: apt-get install qemu-utils)")
    proc = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, pass_fds=pass_fds)
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip()
        if "No space left" in err:
            raise NoSpace(f"qemu-img {args[0]}: no space left on device ({err})")
        raise ToolFailed(f"qemu-img {args[0]} failed: {err}")
    return proc.stdout


def info(path: Path) -> dict:
    """Image facts (format, virtual-size, backing) without following the backing chain.
    ``-U`` lets us read an image that a running guest holds open."""
    return json.loads(_run("info", "-U", "--output=json", str(path)))


def create(path: Path, size: int, *, cluster_size: int | None = None) -> None:
    """A new, empty qcow2 image of ``size`` bytes (no backing file)."""
    opts = f",cluster_size={cluster_size}" if cluster_size else ""
    _run("create", "-q", "-f", "qcow2", "-o", f"compat=1.1{opts}", str(path), str(size))


def copy_locked(source: Path, fmt: str, dest: Path) -> None:
    """A whole, standalone qcow2 copy of a disk that no QEMU runs. Read without ``-U``,
    so qemu-img holds the image's lock: a QEMU starting meanwhile cannot get its write
    lock and fails to start, instead of changing the disk under the copy."""
    _run("convert", "-f", fmt, "-O", "qcow2", str(source), str(dest))


def detach_backing(path: Path) -> None:
    """Drop the backing-file reference libvirt writes into incremental backup targets
    (it names the live disk, which must never be read through on restore)."""
    _run("rebase", "-u", "-b", "", str(path))


@dataclass(frozen=True)
class NbdDisk:
    """A raw disk served over NBD on a Unix socket (a format-2 point's disk, served from
    its chunks by ``storage_backends.format2.nbd``): a layer ``flatten`` reads in place.
    ``socket`` is reached through the descriptor ``fd``, which qemu-img inherits."""

    socket: str
    fd: int


Layer = Path | NbdDisk


def flatten(layers: list[Layer], dest: Path, *, fmt: str = "qcow2") -> None:
    """Write a chain of qcow2 layers (bottom first: a full, then incrementals holding
    only changed clusters) as one standalone image. The chain is described to QEMU on
    the command line, so the layers are read in place and never modified (they may be
    the repository's own files). ``dest`` is created (or emptied) with qemu-img's own
    mode and written as ``flatten_into`` writes."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        flatten_into(layers, fd, fmt=fmt)
    finally:
        os.close(fd)


def flatten_into(layers: list[Layer], fd: int, *, fmt: str = "qcow2") -> None:
    """``flatten`` into the file open as ``fd`` (created by the caller, empty): qemu-img
    reaches it as /proc/self/fd/N, the very file, whatever its name points to by then.
    Written past the page cache where the file's filesystem allows (``direct_writes``)."""
    _run("convert", *_parallel(layers), *direct_writes(fd), "-O", fmt, _chain(layers), f"/proc/self/fd/{fd}",
         pass_fds=(fd, *_fds(layers)))


def direct_writes(fd: int) -> tuple[str, ...]:
    """``-t none`` (qemu-img writes the image with O_DIRECT) when the file open as ``fd``
    can be opened so, else nothing (a filesystem without O_DIRECT, such as tmpfs before
    Linux 6.6: the page cache as before). A restored image is read by its guest later,
    not now: copying it through the page cache cost the restore's CPU (the copy, then
    writing it back) and evicted what the host had cached. Measured restoring 2 GiB from
    a repository's chunks: 3.60 and 3.86 s with the page cache, 3.02 and 3.16 s without
    (docs/benchmarks.md). The caller's fsync afterwards still makes it durable."""
    try:
        probe = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return ()
    os.close(probe)
    return ("-t", "none")


def _parallel(layers: list[Layer]) -> tuple[str, ...]:
    """qemu-img's most requests in flight (16, where 8 is its default) when a layer is
    served from a repository's chunks: each of its requests waits for the chunks' reads
    from storage (a round trip each on S3), so more at a time keep the storage busy.
    Measured through 20 ms of round trip: 71 MiB/s with 8 and the export's 4 workers,
    142 MiB/s with 16 and 16 (docs/benchmarks.md)."""
    return ("-m", "16") if any(isinstance(layer, NbdDisk) for layer in layers) else ()


def _fds(layers: list[Layer]) -> tuple[int, ...]:
    return tuple(layer.fd for layer in layers if isinstance(layer, NbdDisk))


def _chain(layers: list[Layer]) -> str:
    """A bottom layer served over NBD is read as raw; every other layer is qcow2."""
    bottom = layers[0]
    if isinstance(bottom, NbdDisk):
        server = {"type": "unix", "path": bottom.socket}
        node: dict = {"driver": "raw", "file": {"driver": "nbd", "server": server}}
    else:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(bottom)}}
    for layer in layers[1:]:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(layer)}, "backing": node}
    return "json:" + json.dumps(node)


def check(path: Path) -> None:
    """Raise when the qcow2 metadata is damaged."""
    _run("check", "-q", str(path))


def export(layers: list[tuple[Path, str]], dest: Path) -> None:
    """Write the frozen lower layers of a running guest's disk (bottom first, each with
    its format as libvirt reports it) as one standalone qcow2. The chain is given to
    QEMU explicitly (no format probing, no backing names read from image headers), and
    read with ``-U``: the guest's QEMU holds these files, but after an external
    snapshot it never writes them again."""
    node: dict | None = None
    for path, fmt in layers:
        if not fmt:
            raise ToolFailed(f"qemu-img convert: the format of {path} is unknown; refusing to guess it")
        layer: dict = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
        if fmt == "qcow2":
            layer["backing"] = node  # None (JSON null) at the bottom: nothing below it
        elif node is not None:
            raise ToolFailed(f"qemu-img convert: {path} ({fmt}) cannot have a backing file")
        node = layer
    if node is None:
        raise ToolFailed("qemu-img convert: no image to export")
    _run("convert", "-U", "-O", "qcow2", "json:" + json.dumps(node), str(dest))


class ImageData:
    """The guest data a standalone qcow2 file holds (a backup target, its backing
    detached), read straight from the file at the offsets ``qemu-img map`` gives: no
    QEMU process, no copy. ``held`` are the ranges the image has (data or zeros written
    into it): for an incremental backup target, exactly what changed since its
    checkpoint. ``read`` returns zeros where the image holds nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.virtual_size = int(info(path)["virtual-size"])
        rows = json.loads(_run("map", "--output=json", "-f", "qcow2", str(path)))
        self.extents = [(int(r["start"]), int(r["length"]), bool(r.get("present", r.get("data"))),
                         r.get("offset") if r.get("data") else None, bool(r.get("data")), bool(r.get("compressed")))
                        for r in rows]
        self._starts = [e[0] for e in self.extents]
        self._fd: int | None = None

    def __enter__(self) -> ImageData:
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held(self) -> list[tuple[int, int]]:
        return [(start, length) for start, length, present, *_ in self.extents if present]

    def read(self, offset: int, length: int) -> bytes:
        assert self._fd is not None, "use ImageData as a context manager"
        out = bytearray(length)
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        end = offset + length
        while i < len(self.extents) and self.extents[i][0] < end:
            start, size, _present, host, data, compressed = self.extents[i]
            lo, hi = max(start, offset), min(start + size, end)
            if data and hi > lo:
                if compressed or host is None:
                    raise ToolFailed(f"{self.path}: compressed or unmapped data at {start}: not a backup target")
                piece = os.pread(self._fd, hi - lo, int(host) + (lo - start))
                if len(piece) != hi - lo:
                    raise ToolFailed(f"{self.path}: short read at guest offset {lo}")
                out[lo - offset:hi - offset] = piece
            i += 1
        return bytes(out)
