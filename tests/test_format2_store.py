"""Format-2 chunk streams on both real backends (a directory and the S3 endpoint): disks
in real files are cut into chunks, indexed, and read back bit for bit; incrementals read
only what changed, identical data is stored once, and nothing of a disk's content is
visible in what the backend stores."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from virtwarden.storage_backends._stream import TMP_PREFIX
from virtwarden.storage_backends.format2.keys import RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec, DamagedObject
from virtwarden.storage_backends.format2.repository import DomainUsage
from virtwarden.storage_backends.format2.store import ChunkStore, read_disk, write_disk

from tests.test_storage_contract import backend  # noqa: F401 - the nfs and s3 backends, a fixture

MiB = 1024 * 1024
CHUNK = MiB  # small chunks: the same code paths with less data
MARKER = b"VW-FORMAT2-MARKER-7d1e"


def _disk(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


def _reader(path: Path, log: list[tuple[int, int]] | None = None):
    fd = os.open(path, os.O_RDONLY)

    def read_at(offset: int, length: int) -> bytes:
        if log is not None:
            log.append((offset, length))
        return os.pread(fd, length, offset)

    return read_at


def _restore(store: ChunkStore, index, out: Path) -> Path:
    with open(out, "wb") as f:
        f.truncate(index.virtual_size)
        read_disk(store, index, lambda offset, data: os.pwrite(f.fileno(), data, offset))
    return out


def _stored_blobs(store: ChunkStore) -> list[bytes]:
    return [store.backend.get_bytes(store.key(cid)) for cid in store.ids()]


@pytest.fixture
def store(backend):
    return ChunkStore(backend, Codec(RepositoryKey.generate()))


def test_a_disk_restores_bit_for_bit_and_its_content_is_not_in_the_repository(store, tmp_path) -> None:
    size = 8 * MiB + 4096  # a short last chunk
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(MiB)), (3 * MiB + 7, MARKER * 1000),
                                              (8 * MiB, b"tail" * 1024)])
    index, stats = write_disk(store, "vda", _reader(disk), size, CHUNK)

    assert [cid is None for cid in index.chunks] == [False, True, True, False, True, True, True, True, False]
    assert (stats.stored_chunks, stats.zero_chunks) == (3, 6)  # zeros are not stored
    assert all(MARKER not in blob for blob in _stored_blobs(store))
    assert _restore(store, index, tmp_path / "out.raw").read_bytes() == disk.read_bytes()


def test_an_incremental_reads_only_the_changed_chunks_and_both_points_restore(store, tmp_path) -> None:
    size = 16 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    first, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    expected_first = disk.read_bytes()

    changes = [(5 * MiB + 100, 10), (11 * MiB, 2 * MiB)]  # chunks 5, 11 and 12
    with open(disk, "r+b") as f:
        for offset, length in changes:
            f.seek(offset)
            f.write(os.urandom(length))
    reads: list[tuple[int, int]] = []
    second, stats = write_disk(store, "vda", _reader(disk, reads), size, CHUNK, previous=first, changed=changes)

    assert sorted(offset // CHUNK for offset, _ in reads) == [5, 11, 12]
    assert (stats.stored_chunks, stats.reused_chunks) == (3, 13)
    assert _restore(store, first, tmp_path / "first.raw").read_bytes() == expected_first
    assert _restore(store, second, tmp_path / "second.raw").read_bytes() == disk.read_bytes()


def test_a_full_reads_only_the_chunks_that_hold_data(store, tmp_path) -> None:
    """Without a previous index, ``changed`` names where the data is (the image's
    allocation): chunks outside it are zeros, neither read nor stored."""
    size = 8 * MiB
    data = [(MiB + 10, os.urandom(100)), (6 * MiB, os.urandom(MiB + 5))]  # chunks 1, 6 and 7
    disk = _disk(tmp_path / "vda.raw", size, data)
    reads: list[tuple[int, int]] = []
    index, stats = write_disk(store, "vda", _reader(disk, reads), size, CHUNK,
                              changed=[(offset, len(d)) for offset, d in data])
    assert reads == [(MiB, CHUNK), (6 * MiB, CHUNK), (7 * MiB, CHUNK)]  # each chunk whole
    assert (stats.stored_chunks, stats.zero_chunks) == (3, 5)
    assert _restore(store, index, tmp_path / "out.raw").read_bytes() == disk.read_bytes()


def test_an_incremental_from_a_whole_disk_reads_touched_chunks_whole(store, tmp_path) -> None:
    """``whole``: the reader serves the whole disk (an NBD export), so a chunk a small
    change touches is read from it, not rebuilt from the previous chunk."""
    size = 8 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    first, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    with open(disk, "r+b") as f:
        f.seek(3 * MiB + 5)
        f.write(b"changed")
    reads: list[tuple[int, int]] = []
    fetched: list[str] = []
    get = store.get
    store.get = lambda cid, **kw: fetched.append(cid) or get(cid, **kw)  # type: ignore[method-assign]
    second, stats = write_disk(store, "vda", _reader(disk, reads), size, CHUNK, previous=first,
                               changed=[(3 * MiB + 5, 7)], whole=True)
    assert (reads, fetched) == ([(3 * MiB, CHUNK)], [])
    assert (stats.stored_chunks, stats.reused_chunks, stats.read_bytes) == (1, 7, CHUNK)
    assert _restore(store, second, tmp_path / "second.raw").read_bytes() == disk.read_bytes()


def test_chunks_a_published_point_names_are_not_looked_up_again(store, tmp_path, monkeypatch) -> None:
    """A full after a lost bitmap is given the last point's ids as ``known``: of what it
    reads, only a chunk that changed is looked up in storage (on S3 a HEAD request)."""
    size = 8 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    first, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    with open(disk, "r+b") as f:
        f.seek(5 * MiB + 100)
        f.write(os.urandom(100))
    looked: list[str] = []
    exists = store.backend.exists
    monkeypatch.setattr(store.backend, "exists", lambda key: looked.append(key) or exists(key))
    again, stats = write_disk(store, "vda", _reader(disk), size, CHUNK, known=first.referenced())
    assert looked == [store.key(again.chunks[5])]
    assert (stats.read_bytes, stats.stored_chunks, stats.known_chunks) == (size, 1, 7)
    assert _restore(store, again, tmp_path / "again.raw").read_bytes() == disk.read_bytes()


def test_a_full_read_of_unchanged_data_stores_nothing_again(store, tmp_path) -> None:
    """A lost bitmap: everything is read, nothing new is stored."""
    size = 8 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    first, stats1 = write_disk(store, "vda", _reader(disk), size, CHUNK)
    again, stats2 = write_disk(store, "vda", _reader(disk), size, CHUNK)
    assert again == first
    assert (stats2.read_bytes, stats2.stored_bytes, stats2.known_chunks) == (size, 0, 8)
    assert stats1.stored_bytes > size


def test_two_disks_cloned_from_one_template_share_their_chunks(store, tmp_path) -> None:
    size = 16 * MiB
    template = os.urandom(size)
    a = _disk(tmp_path / "a.raw", size, [(0, template)])
    b = _disk(tmp_path / "b.raw", size, [(0, template), (7 * MiB, os.urandom(4096))])  # its own host name, say
    _, first = write_disk(store, "vda", _reader(a), size, CHUNK)
    index_b, second = write_disk(store, "vda", _reader(b), size, CHUNK)
    assert second.stored_bytes <= 0.10 * first.stored_bytes  # one chunk of sixteen
    assert _restore(store, index_b, tmp_path / "b-out.raw").read_bytes() == b.read_bytes()


def damaged_third_chunk(store: ChunkStore, tmp_path: Path):
    """A 4 MiB disk of random data stored, then one byte of its third chunk changed in
    storage: the disk's index and that chunk's id."""
    size = 4 * MiB
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(size))])
    index, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    third = index.chunks[2]
    assert third is not None
    blob = bytearray(store.backend.get_bytes(store.key(third)))
    blob[len(blob) // 2] ^= 0x40
    store.backend.put_bytes(store.key(third), bytes(blob))
    return index, third


def test_a_chunk_known_damaged_is_stored_again_over_the_damaged_object(store, tmp_path) -> None:
    """Storage says the chunk is there (it is: damaged); named in ``damaged``, it is
    written again all the same, and reads intact afterwards. The others are not."""
    first, cid = damaged_third_chunk(store, tmp_path)
    disk = tmp_path / "vda.raw"
    with pytest.raises(DamagedObject):
        store.get(cid)
    again, stats = write_disk(store, "vda", _reader(disk), first.virtual_size, CHUNK, damaged={cid})
    assert again == first
    assert stats.repaired == {cid} and stats.stored_chunks == 1 and stats.known_chunks == 3
    assert _restore(store, again, tmp_path / "out.raw").read_bytes() == disk.read_bytes()


def test_a_changed_or_missing_chunk_is_named_with_its_disk_and_offset(store, tmp_path) -> None:
    index, third = damaged_third_chunk(store, tmp_path)
    with pytest.raises(DamagedObject, match=f"vda at offset {2 * MiB}: chunk {third}: authentication failed"):
        _restore(store, index, tmp_path / "out.raw")
    store.backend.delete(store.key(third))
    with pytest.raises(DamagedObject, match=f"vda at offset {2 * MiB}: chunk {third} is missing"):
        _restore(store, index, tmp_path / "out.raw")


# --- points and gc --------------------------------------------------------------------------
def _repo(backend):
    from virtwarden.storage_backends.format2.repository import Format2Repository

    return Format2Repository.init(backend, Codec(RepositoryKey.generate()), chunk_size=CHUNK)


def _backup(repo, domain: str, point_id: str, disks: dict[str, Path], previous: dict | None = None) -> dict:
    """A point of ``disks`` (target -> raw file) as a backup writes one: chunks, indexes,
    manifest last."""
    ref = repo.ref(domain, point_id)
    entries = []
    for target, path in disks.items():
        size = path.stat().st_size
        index, _ = write_disk(repo.chunks, target, _reader(path), size, repo.chunk_size)
        entries.append({"target": target, "virtual_size": size, "index_sha256": repo.write_index(ref, index)})
    manifest = {"format": 2, "point_id": point_id, "domain": {"name": domain}, "disks": entries}
    repo.write_manifest(ref, manifest)
    return manifest


def _restored(repo, domain: str, point_id: str, out: Path) -> dict[str, bytes]:
    ref = repo.ref(domain, point_id)
    return {index.target: _restore(repo.chunks, index, out / f"{point_id}-{index.target}.raw").read_bytes()
            for index in repo.indexes(ref)}


def test_any_point_can_be_deleted_and_gc_keeps_what_the_others_use(backend, tmp_path) -> None:
    repo = _repo(backend)
    disk = _disk(tmp_path / "vda.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    expected = {}
    for n, at in enumerate((0, 2 * MiB, 2 * MiB)):  # p2 overwrites what p1 wrote: that chunk is p1's alone
        with open(disk, "r+b") as f:
            f.seek(at)
            f.write(os.urandom(MiB))
        _backup(repo, "web01", f"p{n}", {"vda": disk})
        expected[f"p{n}"] = disk.read_bytes()
    repo.delete_point(repo.ref("web01", "p1"))  # the middle one

    report = repo.gc()
    assert report.deferred is None and report.deleted == 1  # the chunk only p1 had
    assert sorted(r.point_id for r in repo.points()) == ["p0", "p2"]
    for point_id in ("p0", "p2"):
        assert _restored(repo, "web01", point_id, tmp_path) == {"vda": expected[point_id]}


def test_usage_counts_each_domains_chunks_and_what_they_take_and_the_unused_ones(backend, tmp_path) -> None:
    """``storage stats``: a chunk two domains share counts for each of them and once in
    the total; one no point names any more is unused."""
    repo = _repo(backend)
    shared, mine, theirs, gone = (os.urandom(MiB) for _ in range(4))
    web = _disk(tmp_path / "web.raw", 4 * MiB, [(0, shared), (MiB, mine)])
    _backup(repo, "web01", "w1", {"vda": web})
    _backup(repo, "web01", "w2", {"vda": web})  # the same chunks again
    db = _disk(tmp_path / "db.raw", 4 * MiB, [(0, shared), (2 * MiB, theirs), (3 * MiB, gone)])
    _backup(repo, "db01", "d1", {"vda": db})
    with open(db, "r+b") as f:
        f.seek(3 * MiB)
        f.write(bytes(MiB))  # a zero piece now
    _backup(repo, "db01", "d2", {"vda": db})
    repo.delete_point(repo.ref("db01", "d1"))  # ``gone`` is named by no point

    usage = repo.usage()
    sizes = {cid: info.size for info in repo.chunks.stored() for cid in [info.key.rsplit("/", 1)[1]]}
    ids = {name: repo.codec.chunk_id(data) for name, data in
           (("shared", shared), ("mine", mine), ("theirs", theirs), ("gone", gone))}
    assert (usage.chunks_stored, usage.chunks_unused, usage.stored_bytes) == (4, 1, sum(sizes.values()))
    assert usage.domains["web01"] == DomainUsage(points=2, logical_bytes=4 * MiB, chunks=2,
                                                 stored_bytes=sizes[ids["shared"]] + sizes[ids["mine"]])
    assert usage.domains["db01"] == DomainUsage(points=1, logical_bytes=2 * MiB, chunks=2,
                                                stored_bytes=sizes[ids["shared"]] + sizes[ids["theirs"]])
    assert usage.total == DomainUsage(points=3, logical_bytes=6 * MiB, chunks=3,
                                      stored_bytes=sum(sizes[ids[n]] for n in ("shared", "mine", "theirs")))
    assert list(usage.domains) == ["db01", "web01"]


def test_gc_defers_while_a_backup_is_under_way_and_a_backup_waits_for_gc(backend, tmp_path) -> None:
    from virtwarden.storage_backends.format2.repository import GcRunning

    repo = _repo(backend)
    disk = _disk(tmp_path / "vda.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])
    _backup(repo, "web01", "p0", {"vda": disk})
    repo.delete_point(repo.ref("web01", "p0"))  # its chunks are unused now...
    marker = repo.begin_writing("backup of web01")  # ...and a backup may be about to name them
    report = repo.gc()
    assert report.deleted == 0 and report.deferred == "1 backup(s) under way: backup of web01"
    repo.end_writing(marker)
    assert repo.gc().deleted == 2

    repo._mark("gc/other", "gc")  # a gc under way (as another process would leave it)
    with pytest.raises(GcRunning, match="gc is running"):
        repo.begin_writing("backup of web01")
    assert repo.writers() == []  # it took its marker back
    report = repo.gc()  # nor do two gcs run at once: the second defers
    assert report.deleted == 0 and report.deferred.startswith("another gc is running: gc on ")
    assert [i.key for i in backend.list("gc/")] == ["gc/other"], "it removed its own marker, not the other's"
    assert repo.begin_writing("later", stale_after=0)  # a dead gc's marker holds nothing back


def test_gc_deletes_nothing_while_a_published_points_index_cannot_be_read(backend, tmp_path) -> None:
    from virtwarden.errors import ObjectNotFound

    repo = _repo(backend)
    _backup(repo, "web01", "p0", {"vda": _disk(tmp_path / "a.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])})
    _backup(repo, "web01", "p1", {"vda": _disk(tmp_path / "b.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])})
    p0, p1 = repo.ref("web01", "p0"), repo.ref("web01", "p1")
    chunks = sorted(i.key for i in backend.list("chunks/"))
    backend.delete(p1.index_key("vda"))  # its manifest still names it: p1's chunks cannot be known
    with pytest.raises(ObjectNotFound):
        repo.gc()
    assert sorted(i.key for i in backend.list("chunks/")) == chunks
    backend.delete(p1.manifest_key)  # as prune leaves a point it is deleting: p1 is gone
    report = repo.gc()
    assert (report.points, report.deleted) == (1, 2) and report.referenced == len(repo.index(p0, "vda").referenced())


def test_gc_keeps_its_marker_fresh_while_it_reads_the_indexes(backend, tmp_path) -> None:
    """Reading every index of a large repository can outlast a marker's freshness; gc
    renews it from its own thread all along, so no backup starts in the middle."""
    import threading
    import time

    from virtwarden.storage_backends.format2.repository import GC_PREFIX, GcRunning

    repo = _repo(backend)
    _backup(repo, "web01", "p0", {"vda": _disk(tmp_path / "a.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])})
    reading, go_on = threading.Event(), threading.Event()
    listed = repo.points

    def slow_points():  # the census, held in the middle as a slow listing would
        reading.set()
        go_on.wait(10)
        return listed()

    repo.points = slow_points
    repo.gc_renew_seconds = 0.05
    gc = threading.Thread(target=repo.gc)
    gc.start()
    try:
        assert reading.wait(10)
        (key,) = [i.key for i in backend.list(GC_PREFIX)]
        first = repo._fresh([key], 3600)[0]["at"]
        time.sleep(0.3)
        assert repo._fresh([key], 3600)[0]["at"] > first, "renewed while the indexes are read"
        with pytest.raises(GcRunning):
            repo.begin_writing("a backup", stale_after=0.2)  # fresh by a short measure too
    finally:
        go_on.set()
        gc.join(10)
    assert not list(backend.list(GC_PREFIX))


def test_a_marker_of_a_process_of_this_machine_that_is_gone_holds_nothing_back(backend, monkeypatch) -> None:
    import subprocess

    repo = _repo(backend)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with monkeypatch.context() as m:  # as a gc and a backup in that process left them (killed)
        m.setattr(os, "getpid", lambda: gone.pid)
        repo._mark("gc/dead", "gc")
        repo._mark("pending/dead", "backup of web01")
    repo.end_writing(repo.begin_writing("a backup"))  # not held back by the dead gc
    report = repo.gc()
    assert report.deferred is None, "nor is gc by the dead backup"
    assert [i.key for i in backend.list("gc/")] == [], "and it removed the dead gc's marker"


def test_a_manifest_or_index_changed_in_storage_is_refused(backend, tmp_path) -> None:
    repo = _repo(backend)
    disk = _disk(tmp_path / "vda.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])
    _backup(repo, "web01", "p0", {"vda": disk})
    _backup(repo, "web01", "p1", {"vda": disk})
    p0, p1 = repo.ref("web01", "p0"), repo.ref("web01", "p1")
    # p0's index replaced by p1's (both sealed with the right key): named for another point
    backend.put_bytes(p0.index_key("vda"), backend.get_bytes(p1.index_key("vda")))
    with pytest.raises(DamagedObject, match=f"index {p0.index_key('vda')}: authentication failed"):
        repo.indexes(p0)
    blob = bytearray(backend.get_bytes(p1.manifest_key))
    blob[-3] ^= 1
    backend.put_bytes(p1.manifest_key, bytes(blob))
    with pytest.raises(DamagedObject, match=f"manifest {p1.manifest_key}: authentication failed"):
        repo.manifest(p1)


def test_a_wrong_key_is_a_clear_error_and_names_leak_nothing(backend, tmp_path) -> None:
    from virtwarden.storage_backends.format2.repository import Format2Repository, NotAFormat2Repository

    repo = _repo(backend)
    disk = _disk(tmp_path / "vda.raw", MiB, [(0, MARKER * 100)])
    _backup(repo, "secret-db-01", "p0", {"vda": disk})
    keys_stored = [info.key for info in backend.list("")]
    assert not [k for k in keys_stored if "secret-db-01" in k]
    assert all(MARKER not in backend.get_bytes(k) and b"secret-db-01" not in backend.get_bytes(k) for k in keys_stored)
    other = Format2Repository(backend, Codec(RepositoryKey.generate()))
    with pytest.raises(NotAFormat2Repository, match="does not open with this key"):
        _ = other.chunk_size


def test_a_repository_created_before_chunk_ids_were_recorded_keeps_naming_chunks_by_hmac(backend, tmp_path) -> None:
    """A repository whose config has no ``chunk_ids`` (created before keyed BLAKE3) has
    chunks named by HMAC-SHA256: opened with today's code its next backup of the same
    data finds them (nothing stored again) and verify's id check passes; a new
    repository records BLAKE3; a config naming a function this code does not know is a
    clear error, not chunks named another way."""
    import json

    from virtwarden.storage_backends.format2 import objects
    from virtwarden.storage_backends.format2.repository import CONFIG_KEY, Format2Repository, NotAFormat2Repository

    key = RepositoryKey.generate()
    assert Format2Repository.init(backend, Codec(key), chunk_size=CHUNK).config["chunk_ids"] == "blake3"
    # Sealed as version 2: code that reads version 1 only (that before chunk_ids) refuses it
    # rather than naming chunks by HMAC-SHA256 in it.
    assert backend.get_bytes(CONFIG_KEY)[len(objects.MAGIC)] == objects.CONFIG_VERSION == 2
    backend.delete(CONFIG_KEY)
    old = Codec(key, ids=objects.HMAC_SHA256)
    config = {"format": 2, "repository": key.repository, "chunk_size": CHUNK, "encryption": "aes-256-gcm",
              "created_at": time.time()}  # what the code before wrote
    backend.put_bytes(CONFIG_KEY, old.seal("config", CONFIG_KEY, json.dumps(config).encode()))
    disk = _disk(tmp_path / "vda.raw", 4 * MiB, [(0, os.urandom(3 * MiB))])
    first, stats = write_disk(ChunkStore(backend, old), "vda", _reader(disk), 4 * MiB, CHUNK)
    assert stats.stored_chunks == 3 * MiB // CHUNK

    repo = Format2Repository(backend, Codec(key))  # today's default is BLAKE3
    again, stats = write_disk(repo.chunks, "vda", _reader(disk), 4 * MiB, repo.chunk_size)
    assert (stats.stored_chunks, stats.known_chunks) == (0, 3 * MiB // CHUNK)
    assert again.chunks == first.chunks and repo.codec.ids == objects.HMAC_SHA256
    for cid in filter(None, again.chunks):
        repo.chunks.get(cid, check_id=True)

    backend.put_bytes(CONFIG_KEY, old.seal("config", CONFIG_KEY, json.dumps({**config, "chunk_ids": "sha3"}).encode()))
    with pytest.raises(NotAFormat2Repository, match="its chunks are named by 'sha3', which this virtwarden does not"):
        Format2Repository(backend, Codec(key)).chunks.ids()


def test_an_incremental_from_an_image_of_the_changes_only_lays_them_over_the_previous_chunks(store, tmp_path) -> None:
    """``read_at`` knows only the changed bytes (as an incremental backup target holds
    only what changed): chunks touched in part are the previous chunk with the change
    laid over it, and the point restores bit for bit."""
    size = 6 * MiB + 4096
    disk = _disk(tmp_path / "vda.raw", size, [(0, os.urandom(4 * MiB)), (6 * MiB, os.urandom(4096))])
    first, _ = write_disk(store, "vda", _reader(disk), size, CHUNK)
    changes = {100: os.urandom(10), MiB - 4096: os.urandom(8192), 5 * MiB: os.urandom(4096),  # 5 MiB: a zero chunk
               2 * MiB: os.urandom(MiB)}  # a whole chunk
    with open(disk, "r+b") as f:
        for offset, data in changes.items():
            f.seek(offset)
            f.write(data)

    def only_changes(offset: int, length: int) -> bytes:
        for at, data in changes.items():
            if at <= offset and offset + length <= at + len(data):
                return data[offset - at:offset - at + length]
        raise AssertionError(f"read {offset}+{length} outside the changes")

    second, stats = write_disk(store, "vda", only_changes, size, CHUNK, previous=first,
                               changed=[(at, len(data)) for at, data in changes.items()])
    assert stats.read_bytes == sum(len(d) for d in changes.values())
    assert _restore(store, second, tmp_path / "second.raw").read_bytes() == disk.read_bytes()


def test_image_data_reads_a_qcow2_file_as_the_guest_sees_it(tmp_path) -> None:
    """A backup target qcow2 read straight from its file: the ranges it holds (what an
    incremental target has) and the bytes at each guest offset."""
    import shutil
    import subprocess

    from virtwarden.hypervisor.qemu_img import ImageData

    from tests.conftest import need

    need(shutil.which("qemu-io") is not None, "qemu-io is not installed (qemu-utils)")
    image = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    raw = bytearray(8 * MiB)
    for offset, data in ((65536, os.urandom(65536)), (3 * MiB + 4096, os.urandom(200_000))):
        (tmp_path / "piece").write_bytes(data)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {tmp_path / 'piece'} {offset} {len(data)}",
                        str(image)], check=True, capture_output=True)
        raw[offset:offset + len(data)] = data
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -z {6 * MiB} 65536", str(image)], check=True,
                   capture_output=True)
    with ImageData(image) as img:
        assert img.virtual_size == 8 * MiB
        assert img.held() == [(65536, 65536), (3 * MiB, 4 * 65536), (6 * MiB, 65536)]  # whole clusters
        assert img.read(0, 8 * MiB) == bytes(raw)
        assert img.read(3 * MiB + 4000, 300) == bytes(raw[3 * MiB + 4000:3 * MiB + 4300])


def _empty_catalog(tmp_path: Path):
    """A catalog with no points: a full's ``PointSink`` looks for the domain's last one."""
    from virtwarden.catalog.store import Catalog

    return Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_a_backup_that_ends_while_its_marker_is_being_renewed_leaves_no_marker(backend, tmp_path) -> None:
    """The renewal runs in a thread of its own; a renewal in flight when the backup ends
    must not write the marker again after it was removed (gc would then keep off for a
    day). Renewals as often as the storage takes them, ended 15 times."""
    from types import SimpleNamespace

    from virtwarden.tasks.backup_steps import LevelPlan, PointSink
    from virtwarden.tasks.context import JobContext

    repo = _repo(backend)
    ctx = JobContext("job-1", catalog=_empty_catalog(tmp_path), hypervisor=None,  # type: ignore[arg-type]
                     storage=lambda _name: backend, scratch_root=tmp_path, repository=lambda _name: repo)
    for n in range(15):
        sink = PointSink(ctx, "vault", SimpleNamespace(name="web01"), f"p{n}", LevelPlan("full", "a test"))  # type: ignore[arg-type]
        sink.renew_seconds = 0.0005
        sink.begin(f"backup {n} of web01")
        time.sleep(0.02)  # renewing
        sink.close()
        assert repo.writers() == [], n


def test_a_long_backup_keeps_its_gc_marker_fresh_until_it_ends(backend, tmp_path) -> None:
    """A backup longer than the time after which gc ignores a marker (a day) renews its
    own while it runs, so gc keeps off however long it takes; at its end the marker goes."""
    import time
    from types import SimpleNamespace

    from virtwarden.tasks.backup_steps import LevelPlan, PointSink
    from virtwarden.tasks.context import JobContext

    repo = _repo(backend)
    ctx = JobContext("job-1", catalog=_empty_catalog(tmp_path), hypervisor=None,  # type: ignore[arg-type]
                     storage=lambda _name: backend, scratch_root=tmp_path, repository=lambda _name: repo)
    sink = PointSink(ctx, "vault", SimpleNamespace(name="web01"), "p1", LevelPlan("full", "a test"))  # type: ignore[arg-type]
    sink.renew_seconds = 0.2
    sink.begin("backup of web01")
    try:
        time.sleep(1.0)
        assert [w["what"] for w in repo.writers(stale_after=0.6)] == ["backup of web01"]  # renewed, not just made
        assert repo.gc().deferred == "1 backup(s) under way: backup of web01"
    finally:
        sink.close()
    assert repo.writers() == [] and repo.gc().deferred is None


# --- NFS: a disk's chunks synced together ----------------------------------------------------
def _nfs(tmp_path: Path, **settings):
    from virtwarden.storage_backends.nfs import NfsBackend

    from virtwarden.config import NfsStorage

    root = tmp_path / "repository"
    root.mkdir()
    return NfsBackend("test", NfsStorage(type="nfs", path=str(root), **settings))


class Concurrency:
    """The most calls of ``around`` under way at once, each made to take ``seconds``
    (what a round trip to storage does)."""

    def __init__(self, seconds: float = 0.02) -> None:
        import threading

        self.seconds, self.now, self.most = seconds, 0, 0
        self._lock = threading.Lock()

    def around(self, fn):
        def wrapped(*args, **kwargs):
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(self.seconds)
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1
        return wrapped


def test_a_disk_is_stored_and_read_back_as_many_chunks_at_a_time_as_its_storage_says(tmp_path) -> None:
    """``chunk_concurrency``: 4 by default on a directory, 16 on S3 (each chunk there
    waits a round trip); both streams keep that many chunks under way, no more."""
    from virtwarden.config import NfsStorage, S3Storage

    assert NfsStorage(type="nfs", path="/x").chunk_concurrency == 4
    assert S3Storage(type="s3", bucket="b").chunk_concurrency == 16
    store = ChunkStore(_nfs(tmp_path, chunk_concurrency=6), Codec(RepositoryKey.generate()))
    disk = _disk(tmp_path / "vda.raw", 24 * MiB, [(0, os.urandom(24 * MiB))])
    reads = Concurrency()
    index, _ = write_disk(store, "vda", reads.around(_reader(disk)), 24 * MiB, CHUNK)
    gets = Concurrency()
    store.backend.get_bytes = gets.around(store.backend.get_bytes)  # type: ignore[method-assign]
    assert _restore(store, index, tmp_path / "out.raw").read_bytes() == disk.read_bytes()
    assert (reads.most, gets.most) == (6, 6)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_nfs_chunks_get_their_names_only_after_one_sync_of_all_their_bytes(tmp_path, monkeypatch) -> None:
    """Chunks are written under temporary names without a sync each, and renamed into
    place only after a sync of the filesystem: a crash can leave temporary files, never a
    named chunk whose bytes were not on disk. Every ``LIMIT`` chunks and at the end. Each
    chunk's writeback is started as soon as it is written, so the syncs find its bytes
    written or on their way."""
    from virtwarden.storage_backends.nfs import _SyncedTogether

    backend = _nfs(tmp_path)
    syncs = []
    started = []
    monkeypatch.setattr("virtwarden.storage_backends._stream.sync_filesystem", syncs.append)
    monkeypatch.setattr("virtwarden.storage_backends._stream.start_writeback",
                        lambda fd: started.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(_SyncedTogether, "LIMIT", 3)
    with backend.batch() as batch:
        for n in range(4):
            batch.put_bytes(f"chunks/ab/c{n}", b"x" * n)
            assert batch.exists(f"chunks/ab/c{n}")
        # three were synced and renamed together (two syncs: the bytes, then the names)
        assert syncs == [backend.root] * 2
        assert [i.key for i in backend.list("chunks/")] == ["chunks/ab/c0", "chunks/ab/c1", "chunks/ab/c2"]
        assert not backend.exists("chunks/ab/c3")  # written, not synced: not there yet
    assert syncs == [backend.root] * 4
    # each chunk's temporary file, once
    assert len(started) == 4 and all(
        Path(p).name.startswith(TMP_PREFIX) and Path(p).parent == backend.root / "chunks/ab" for p in started), started
    assert backend.get_bytes("chunks/ab/c3") == b"xxx"
    assert _files(backend.root) == ["chunks/ab/c0", "chunks/ab/c1", "chunks/ab/c2", "chunks/ab/c3"]


def test_nfs_a_disk_write_that_fails_midway_leaves_no_chunk_and_no_file(tmp_path) -> None:
    store = ChunkStore(_nfs(tmp_path), Codec(RepositoryKey.generate()))
    disk = _disk(tmp_path / "vda.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    read = _reader(disk)

    def failing(offset: int, length: int) -> bytes:
        if offset >= 5 * MiB:
            raise OSError(5, "Input/output error")
        return read(offset, length)

    with pytest.raises(OSError, match="Input/output"):
        write_disk(store, "vda", failing, 8 * MiB, CHUNK, workers=1)
    assert _files(store.backend.root) == []


def test_nfs_a_backup_killed_before_its_chunks_are_synced_leaves_only_what_gc_removes(tmp_path) -> None:
    """SIGKILL of a real process between writing a disk's chunks and syncing them: no
    chunk is named (nothing can reference a chunk whose bytes may be lost), the temporary
    files stay until gc, and the same disk backed up again restores bit for bit."""
    import subprocess
    import sys

    repo = _repo(_nfs(tmp_path))
    disk = _disk(tmp_path / "vda.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    writer = (
        "import os, sys\n"
        "from virtwarden.config import NfsStorage\n"
        "from virtwarden.storage_backends.nfs import NfsBackend\n"
        "from virtwarden.storage_backends.format2.keys import RepositoryKey\n"
        "from virtwarden.storage_backends.format2.objects import Codec\n"
        "from virtwarden.storage_backends.format2.store import ChunkStore, write_disk\n"
        "backend = NfsBackend('t', NfsStorage(type='nfs', path=sys.argv[1]))\n"
        "store = ChunkStore(backend, Codec(RepositoryKey.generate()))\n"
        "fd = os.open(sys.argv[2], os.O_RDONLY)\n"
        f"write_disk(store, 'vda', lambda o, n: os.pread(fd, n, o), {8 * MiB}, {CHUNK})\n")
    env = {**os.environ, "VIRTWARDEN_FAULT_KILL": "chunks-before-sync",
           "VIRTWARDEN_FAULT_DIR": str(tmp_path / "faults")}
    done = subprocess.run([sys.executable, "-c", writer, str(repo.backend.root), str(disk)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    left = [f for f in _files(repo.backend.root) if f.startswith("chunks/")]
    assert len(left) == 8 and all(f.rpartition("/")[2].startswith(".tmp-") for f in left)
    assert list(repo.backend.list("chunks/")) == []

    report = repo.gc()
    assert report.deferred is None and report.chunks == 0
    assert [f for f in _files(repo.backend.root) if f.startswith("chunks/")] == []
    _backup(repo, "web01", "p0", {"vda": disk})
    assert _restored(repo, "web01", "p0", tmp_path) == {"vda": disk.read_bytes()}


def test_an_incremental_whose_parent_went_before_its_marker_stores_nothing(backend, tmp_path) -> None:
    """The parent's indexes are read when the backup is planned, before its gc marker
    exists: a prune (and a gc) in between may take the chunks it would name unread. The
    attempt fails as transient before storing anything, and leaves no marker."""
    from types import SimpleNamespace

    from virtwarden.tasks.backup_steps import LevelPlan, ParentGone, PointSink
    from virtwarden.tasks.context import JobContext

    repo = _repo(backend)
    _backup(repo, "web01", "p0", {"vda": _disk(tmp_path / "vda.raw", 2 * MiB, [(0, os.urandom(MiB))])})
    ctx = JobContext("job-1", catalog=_empty_catalog(tmp_path), hypervisor=None,  # type: ignore[arg-type]
                     storage=lambda _name: backend, scratch_root=tmp_path, repository=lambda _name: repo)
    parent = SimpleNamespace(format=2, domain="web01", id="p0")
    sink = PointSink(ctx, "vault", SimpleNamespace(name="web01"), "p1",  # type: ignore[arg-type]
                     LevelPlan("incremental", "a test", parent))  # type: ignore[arg-type]
    assert list(sink.previous) == ["vda"]
    repo.delete_point(repo.ref("web01", "p0"))
    try:
        with pytest.raises(ParentGone, match="point p0, which this incremental builds on, was deleted"):
            sink.begin("backup of web01")
    finally:
        sink.close()
    assert repo.writers() == []


def test_new_data_stops_being_looked_up_one_chunk_at_a_time_where_a_lookup_is_a_request(backend, tmp_path) -> None:
    """On S3 each lookup is a HEAD request before the PUT: after 64 new chunks in a row
    only every 8th is asked about. A clone of that data (a second domain from one
    template) is found from its first chunk and stays looked up chunk by chunk: nothing
    of it is stored again. On a directory every chunk is looked up (a stat)."""
    from virtwarden.storage_backends.format2.store import Lookups

    store = ChunkStore(backend, Codec(RepositoryKey.generate()))
    size, chunk = 96 * MiB, 512 * 1024
    n = size // chunk
    disk = _disk(tmp_path / "template.raw", size, [(0, os.urandom(size))])
    asked: list[str] = []
    exists = store.backend.exists
    store.backend.exists = lambda key: asked.append(key) or exists(key)  # type: ignore[method-assign]
    first, stats = write_disk(store, "vda", _reader(disk), size, chunk)
    assert stats.stored_chunks == n
    costly = backend.kind == "s3"
    if costly:  # chunks under way when the 64th miss is seen are asked about too
        assert Lookups.MISSES <= len(asked) <= Lookups.MISSES + 2 * store.workers + n // Lookups.SAMPLE < n
    else:
        assert len(asked) == n
    asked.clear()
    clone, stats = write_disk(store, "vdb", _reader(disk), size, chunk)
    assert (stats.stored_chunks, stats.known_chunks, len(asked)) == (0, n, n)
    assert clone.chunks == first.chunks
    assert _restore(store, clone, tmp_path / "out.raw").read_bytes() == disk.read_bytes()


def test_a_chunk_stored_without_a_lookup_never_replaces_one_that_is_there(backend, tmp_path, monkeypatch) -> None:
    """In a run of new data on S3 most chunks are stored without asking first: with a PUT
    the endpoint refuses when an object is there (``If-None-Match: *``). A chunk stored
    before met that way is left as it was (a replaced one would have another ETag: it is
    sealed with a fresh nonce), counted as already stored, and brings back a lookup of
    every chunk. (On a directory the same write looks first, then stores: forced here.)"""
    from virtwarden.storage_backends.format2.store import Lookups

    monkeypatch.setattr(Lookups, "SAMPLE", 10**9)  # no lookups at all once the run is long
    backend.costly_lookups = True
    store = ChunkStore(backend, Codec(RepositoryKey.generate()))
    chunk, n = 512 * 1024, 160
    old = os.urandom(4 * chunk)
    first, _ = write_disk(store, "vda", _reader(_disk(tmp_path / "old.raw", 4 * chunk, [(0, old)])), 4 * chunk, chunk)
    before = {info.key: (info.size, backend.get_bytes(info.key)) for info in backend.list("chunks/")}
    size = n * chunk
    disk = _disk(tmp_path / "new.raw", size, [(0, os.urandom(size)), (120 * chunk, old)])  # 4 old chunks late
    answers: list[bool] = []
    batch_type = type(backend.batch())  # the backend's batch (a directory's holds objects back)
    put_new = batch_type.put_new_bytes

    def recorded(batch, key, data):
        answers.append(put_new(batch, key, data))
        return answers[-1]

    monkeypatch.setattr(batch_type, "put_new_bytes", recorded)
    index, stats = write_disk(store, "vda", _reader(disk), size, chunk)
    assert False in answers  # an old chunk met without a lookup, refused by storage
    assert (stats.stored_chunks, stats.known_chunks) == (n - 4, 4)
    assert index.chunks[120:124] == first.chunks
    assert all(backend.get_bytes(key) == blob for key, (_, blob) in before.items())  # none replaced
    assert _restore(store, index, tmp_path / "out.raw").read_bytes() == disk.read_bytes()
