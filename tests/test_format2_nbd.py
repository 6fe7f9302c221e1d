"""A format-2 disk served over NBD from its chunks, read by the real ``qemu-img``: the
one-pass restore (storage_backends/format2/nbd.py). On both real backends (a directory
and the S3 endpoint)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from virtwarden.hypervisor import qemu_img
from virtwarden.storage_backends.format2.nbd import ChunkExport
from virtwarden.storage_backends.format2.store import write_disk
from virtwarden.tasks.restore import served_disks

from tests.harness import wait_for
from tests.test_format2_store import _disk, _reader, damaged_third_chunk, store  # noqa: F401 - store: a fixture
from tests.test_storage_contract import backend  # noqa: F401 - the nfs and s3 backends, a fixture
from virtwarden.errors import ChecksumMismatch

MiB = 1024 * 1024
CHUNK = MiB


def _raw(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def _allocated(image: Path) -> int:
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(image)], check=True,
                                        capture_output=True, text=True).stdout)
    return sum(e["length"] for e in extents if e["data"])


def test_a_disk_served_from_its_chunks_converts_bit_for_bit_leaving_its_zero_pieces_unallocated(store, tmp_path):
    size = 8 * MiB + 4096  # a short last piece
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(MiB)), (3 * MiB + 7, os.urandom(5000)),
                                              (8 * MiB, b"tail" * 1024)])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    assert sum(cid is not None for cid in index.chunks) == 3

    with served_disks(store, [index], "p1", tmp_path) as served:
        qemu_img.flatten([served["vda"]], tmp_path / "vda.qcow2")

    assert _raw(tmp_path / "vda.qcow2", tmp_path / "back.raw") == disk.read_bytes()
    assert qemu_img.info(tmp_path / "vda.qcow2")["virtual-size"] == size
    assert _allocated(tmp_path / "vda.qcow2") <= 2 * MiB + 64 * 1024  # the three stored pieces, in whole clusters


def test_a_damaged_or_missing_chunk_fails_the_restore_naming_the_point_disk_and_offset(store, tmp_path):
    index, third = damaged_third_chunk(store, tmp_path)
    with pytest.raises(ChecksumMismatch, match=f"restore point p1: vda at offset {2 * MiB}: chunk {third}: "
                                               "authentication failed.*; nothing was written"), \
            served_disks(store, [index], "p1", tmp_path) as served:
        qemu_img.flatten([served["vda"]], tmp_path / "damaged.qcow2")
    store.backend.delete(store.key(third))
    with pytest.raises(ChecksumMismatch, match=f"vda at offset {2 * MiB}: chunk {third} is missing"), \
            served_disks(store, [index], "p1", tmp_path) as served:
        qemu_img.flatten([served["vda"]], tmp_path / "missing.qcow2")


def test_the_export_is_read_only_and_its_socket_goes_with_it(store, tmp_path):
    size = 2 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, b"\x5a" * size)])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # longer than a socket address may be
    deep.mkdir(parents=True)
    with ChunkExport(store, index, deep) as export:
        uri = f"nbd+unix:///?socket={export.socket}"

        def qemu_io(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["qemu-io", *args, uri], capture_output=True, text=True, pass_fds=(export.fd,))

        read = qemu_io("-r", "-f", "raw", "-c", "read -P 0x5a 0 2M")
        assert read.returncode == 0 and "read 2097152/2097152 bytes" in read.stdout, read.stdout + read.stderr
        write = qemu_io("-f", "raw", "-c", "write -P 0 0 4k")
        # The export says it is read-only: QEMU will not even open it for writing.
        assert write.returncode != 0 and "wrote" not in write.stdout, write.stdout
        assert "permission denied" in write.stderr.lower(), write.stderr
        [sock] = deep.iterdir()
        assert sock.is_socket() and sock.stat().st_mode & 0o077 == 0  # this user's only
    assert list(deep.iterdir()) == []
    assert b"".join(store.get(cid) for cid in index.chunks if cid is not None) == disk.read_bytes()


# --- the client, reading qemu-nbd's export of an image (a shut-off domain's disk) ------------
def test_qemu_nbds_export_of_a_chain_reads_as_the_guest_sees_it_and_says_where_data_is(tmp_path):
    from virtwarden.hypervisor.nbd import ImageExport

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 4M", "-c", "write -q -P 0x22 32M 1M",
                    str(base)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x33 1M 1M", str(top)], check=True)
    deep = tmp_path / ("d" * 70) / ("e" * 70)  # longer than a socket address may be
    deep.mkdir(parents=True)
    with ImageExport(top, "qcow2", deep) as disk:
        assert disk.virtual_size == 64 * MiB
        assert disk.held() == [(0, 4 * MiB), (32 * MiB, MiB)]
        data = b"".join(disk.read(offset, 4 * MiB) for offset in range(0, disk.virtual_size, 4 * MiB))
    assert data == _raw(top, tmp_path / "top.raw")
    assert list(deep.iterdir()) == []  # the socket went with the export


def test_an_export_that_dies_fails_the_read_clearly_and_a_held_image_is_refused(tmp_path):
    from virtwarden.hypervisor.nbd import ImageExport, NbdError

    from virtwarden.errors import ToolFailed

    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    with ImageExport(image, "qcow2", tmp_path) as disk:
        assert disk.read(0, 4096) == bytes(4096)
        disk._proc.kill()  # qemu-nbd dies under the reader
        disk._proc.wait()
        with pytest.raises(NbdError, match="closed the connection"):
            disk.read(0, 4096)
    # A process holding the image for writing, as a running guest's QEMU does: qemu-io,
    # once it has the image open (its lock is taken then).
    writer = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(image)])
    try:
        wait_for(lambda: any(os.path.realpath(f"/proc/{writer.pid}/fd/{fd}") == str(image)
                             for fd in os.listdir(f"/proc/{writer.pid}/fd")), 30, "qemu-io to open the image")
        with pytest.raises(ToolFailed, match="lock"):
            ImageExport(image, "qcow2", tmp_path)
    finally:
        writer.kill()
        writer.wait()


def test_a_wedged_export_fails_the_read_and_a_silent_server_the_handshake(tmp_path, monkeypatch):
    """A server that stops answering (qemu-nbd SIGSTOPped under the reader, as a hung QEMU
    would be) fails the read within the client's timeout instead of holding the job for
    ever; so does one that accepts and never speaks."""
    import signal
    import socket
    import time

    from virtwarden.hypervisor import nbd
    from virtwarden.hypervisor.nbd import ImageExport, NbdClient, NbdError

    monkeypatch.setattr(nbd, "IO_SECONDS", 1.0)
    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    with ImageExport(image, "qcow2", tmp_path) as disk:
        assert disk.read(0, 4096) == bytes(4096)
        os.kill(disk._proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(NbdError, match="did not answer within 1s"):
                disk.read(0, 4096)
            assert time.monotonic() - start < 10
        finally:
            os.kill(disk._proc.pid, signal.SIGCONT)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen(1)
        with pytest.raises(NbdError, match="did not answer within 1s"):  # in its handshake
            NbdClient(str(tmp_path / "silent.sock"))
    finally:
        silent.close()


def test_requests_outside_the_disk_or_too_large_are_refused_and_the_export_still_serves(store, tmp_path):
    """A client that asks for what the export does not serve gets an error for that
    request only; a write announcing more payload than any request may carry is hung up on."""
    from virtwarden.hypervisor.nbd import NbdClient, NbdError

    from virtwarden import nbd_protocol as P

    size = 2 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, b"\x5a" * size)])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    with ChunkExport(store, index, tmp_path) as export:
        client = NbdClient(export.socket)
        assert client.size == size and client.flags & P.READ_ONLY
        with pytest.raises(NbdError, match="Invalid argument"):
            client.read(size - 4096, 8192)  # past the end
        with pytest.raises(NbdError, match="Invalid argument"):
            client.read(0, 64 << 20)  # more than a request may ask
        assert client.read(0, 4096) == b"\x5a" * 4096  # the connection goes on
        assert client.extents(0, size) == [(0, size, 0)]  # data, neither hole nor zero
        client.close()

        raw = NbdClient(export.socket)
        raw.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 1 << 30))
        raw.sock.settimeout(10)
        assert raw.sock.recv(16) == b""  # hung up
        raw.sock.close()
        again = NbdClient(export.socket)
        assert again.read(size - 4096, 4096) == b"\x5a" * 4096
        again.close()


def test_a_pull_backup_whose_export_offers_no_dirty_bitmap_reads_the_whole_disk(store, tmp_path):
    """An incremental asks the export for its disk's dirty bitmap; an export without it
    (here our restore export, which serves base:allocation only) makes it read
    everything: only changed chunks are stored anyway, nothing is missed."""
    from virtwarden.hypervisor.nbd import NbdReader
    from virtwarden.tasks.backup_steps import _Pulled

    from virtwarden.nbd_protocol import BASE_ALLOCATION

    size = 2 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, b"\x5a" * MiB)])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    dirty = b"qemu:dirty-bitmap:backup-vda"
    with ChunkExport(store, index, tmp_path) as export:
        reader = NbdReader(export.socket, "vda", (BASE_ALLOCATION, dirty))
        try:
            assert reader.offers(BASE_ALLOCATION) and not reader.offers(dirty)
            assert _Pulled(reader, dirty).held() == [(0, size)]
            assert reader.held() == [(0, MiB)]  # what base:allocation says holds data
        finally:
            reader.close()


def test_a_restore_from_chunks_keeps_as_many_reads_under_way_as_its_storage_says(tmp_path):
    """qemu-img asks for up to 16 pieces at a time of a disk served from chunks, and the
    export answers ``chunk_concurrency`` of them at once: with a round trip to storage
    for each chunk (S3), 4 at a time restored at half the pace (docs/benchmarks.md)."""
    from virtwarden.storage_backends.format2.keys import RepositoryKey
    from virtwarden.storage_backends.format2.objects import Codec
    from virtwarden.storage_backends.format2.store import ChunkStore

    from tests.test_format2_store import Concurrency, _nfs

    store = ChunkStore(_nfs(tmp_path, chunk_concurrency=16), Codec(RepositoryKey.generate()))
    size = 64 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    gets = Concurrency()
    store.backend.get_bytes = gets.around(store.backend.get_bytes)  # type: ignore[method-assign]
    with served_disks(store, [index], "p1", tmp_path) as served:
        qemu_img.flatten([served["vda"]], tmp_path / "vda.qcow2")
    assert _raw(tmp_path / "vda.qcow2", tmp_path / "back.raw") == disk.read_bytes()
    assert 12 <= gets.most <= 16


def test_images_are_written_past_the_page_cache_where_their_filesystem_allows(tmp_path):
    """``-t none`` for a file that opens with O_DIRECT, nothing for one that does not (a
    socket here; a filesystem without O_DIRECT the same way): qemu-img then writes
    through the page cache as it always did."""
    import socket

    with open(tmp_path / "image", "wb") as f:
        assert qemu_img.direct_writes(f.fileno()) == ("-t", "none")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        assert qemu_img.direct_writes(s.fileno()) == ()
