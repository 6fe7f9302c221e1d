"""Storage faults met by real backups and restores, through real workers and the CLI:
an S3 endpoint that answers 503 Slow Down or receives a damaged part (through
tests/faultproxy.py), an artifact changed on a mounted target after a restore checked
it, and a mounted target that runs out of space in the middle of a backup."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtwarden.catalog import jobs as job_rows

from tests.conftest import need
from tests.faultproxy import FaultProxy, Rule, upload_part
from tests.guests import images_equal
from tests.harness import TEST_WORKER, s3_storage_entry, wait_for
from tests.s3server import s3_client

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024


def _backup(vw, domain: str, *args: str):
    return vw.cli("backup", domain, *args, "--wait", "--json")


def _restored_equal(vw, g, tmp_path: Path, expected: Path, name: str) -> bool:
    out = tmp_path / name
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    return images_equal(out / "vda.qcow2", expected)


def _uploads_left(settings) -> list:
    return s3_client(settings.endpoint_url).list_multipart_uploads(Bucket=settings.bucket).get("Uploads", [])


def _keys_of(settings, point_id: str) -> list[str]:
    reply = s3_client(settings.endpoint_url).list_objects_v2(Bucket=settings.bucket)
    return [o["Key"] for o in reply.get("Contents", []) if point_id in o["Key"]]


# --- S3 ----------------------------------------------------------------------------------
def test_s3_backup_whose_first_parts_are_answered_slow_down_succeeds_and_restores(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path):
    vw.storage["s3"] = s3_storage_entry(s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    g = guest_factory(disks=1, size_mib=64)
    g.write_random("vda", 0, 20 * MiB)  # about four 5 MiB parts
    s3_fault_proxy.add(Rule(upload_part, "respond", times=2, status=503))
    vw.start_worker()

    r = _backup(vw, g.name, "--target", "s3")
    assert r.code == 0, r.err
    assert len(s3_fault_proxy.handled("respond")) == 2  # the endpoint never saw those two
    assert all(s.status == 200 for s in s3_fault_proxy.requests(upload_part) if s.action == "pass")
    assert _uploads_left(s3_settings) == []
    assert _restored_equal(vw, g, tmp_path, g.shadow_copy("vda", tmp_path / "vda.raw"), "restored")


def test_s3_backup_with_a_part_damaged_in_transit_never_lists_it_as_restorable(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path):
    """One byte of the first part flipped on its way. An endpoint that checks part
    checksums (AWS S3, MinIO) answers 400 BadDigest and the part is sent again; the
    moto endpoint of the test bed stores it, and the job's check of the endpoint's
    checksum of the stored parts fails it (exit 6). Nothing damaged is listed either way."""
    vw.storage["s3"] = s3_storage_entry(s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    g = guest_factory(disks=1, size_mib=64)
    g.write_random("vda", 0, 20 * MiB)
    at_backup = g.shadow_copy("vda", tmp_path / "at-backup.raw")
    s3_fault_proxy.add(Rule(upload_part, "corrupt", times=1))
    vw.start_worker()

    r = _backup(vw, g.name, "--target", "s3")
    [damaged] = s3_fault_proxy.handled("corrupt")
    listed = vw.cli("backups", g.name, "--json").json()
    if damaged.status == 400:  # the endpoint refused the part by its checksum
        assert b"BadDigest" in damaged.reply
        assert r.code == 0, r.err
        assert [p["status"] for p in listed] == ["complete"]
    else:  # the endpoint stored it: the job's check must catch it
        assert damaged.status == 200
        assert r.code == 6, r.err  # ChecksumMismatch
        assert "damaged in transit" in r.err and "storage 's3'" in r.err
        assert [p["status"] for p in listed] == ["failed"]
        assert _keys_of(s3_settings, listed[0]["id"]) == []
        r = _backup(vw, g.name, "--target", "s3")  # the next run works
        assert r.code == 0, r.err
    assert _uploads_left(s3_settings) == []
    assert _restored_equal(vw, g, tmp_path, at_backup, "restored")


# --- a restore uses only bytes it verified ------------------------------------------------
def _hold_qemu_img_convert(shim: Path, hold: Path) -> None:
    """A ``qemu-img`` first on PATH that holds a restore's rebuild (``convert`` of a
    ``json:`` chain) until the test creates ``hold/go``, then runs the real one."""
    real = shutil.which("qemu-img")
    assert real, "qemu-img is not installed"
    shim.mkdir()
    hold.mkdir()
    script = shim / "qemu-img"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1 $*" in\n'
        f'  convert*json:*) touch {hold}/waiting; n=0\n'
        f'    while [ ! -e {hold}/go ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done ;;\n'
        "esac\n"
        f'exec {real} "$@"\n')
    script.chmod(0o755)


def _data_offset(image: Path) -> int:
    """A file offset inside the first cluster of guest data in a qcow2 image."""
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                                        capture_output=True, text=True, check=True).stdout)
    return next(e["offset"] for e in extents if e["data"] and "offset" in e) + 4096


def test_an_artifact_changed_on_storage_after_the_restore_checked_it_never_reaches_the_image(
        vw, guest_factory, tmp_path, monkeypatch):
    shim, hold = tmp_path / "shim", tmp_path / "hold"
    _hold_qemu_img_convert(shim, hold)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")  # the worker inherits it
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    at_backup = g.shadow_copy("vda", tmp_path / "at-backup.raw")
    vw.start_worker()
    r = _backup(vw, g.name)
    assert r.code == 0, r.err
    point = r.json()["result"]
    stored = vw.root / "repository" / g.name / point["chain_id"] / point["point_id"] / "vda.qcow2"

    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(tmp_path / "restored"), "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    wait_for(lambda: (hold / "waiting").exists(), 120, "the restore to verify and start its rebuild")
    with open(stored, "r+b") as f:  # the stored artifact changes after its check
        f.seek(_data_offset(stored))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    (hold / "go").touch()
    cat = vw.catalog()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the restore to finish")

    if done.state == "failed":
        assert "ChecksumMismatch" in (done.result or {}).get("error_type", ""), done.error
    else:
        assert images_equal(tmp_path / "restored" / "vda.qcow2", at_backup)
    # The change was real: the artifact no longer passes its check.
    (hold / "go").touch()
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(tmp_path / "again"), "--wait")
    assert r.code == 6 and "is corrupt: expected sha256" in r.err, r.err


# --- a mounted target runs out of space -------------------------------------------------------
@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB ext4 filesystem, loop-mounted (no root reserve), removed afterwards."""
    need(os.geteuid() == 0, "loop-mounting a filesystem needs root")
    need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed (e2fsprogs)")
    image, mount = tmp_path / "share.img", tmp_path / "share"
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    mount.mkdir()
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    need(done.returncode == 0, f"cannot loop-mount a filesystem here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, leave: int) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        while (room := _free(path) - leave) > 0:
            f.write(b"\0" * min(room, 4 * MiB))
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_a_backup_that_fills_its_mounted_target_fails_clearly_and_leaves_nothing(
        vw, guest_factory, small_filesystem: Path, tmp_path):
    share = small_filesystem
    vw.storage["nfs"] = {"type": "nfs", "path": str(share)}
    g = guest_factory(disks=1, size_mib=128)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name)
    assert r.code == 0, r.err
    first = r.json()["result"]["point_id"]

    filler = _fill(share, leave=24 * MiB)
    g.write_random("vda", 16 * MiB, 48 * MiB)  # an incremental twice the room left
    r = _backup(vw, g.name)
    assert r.code == 6, r.err  # NoSpace
    assert "storage 'nfs'" in r.err and "is full" in r.err, r.err
    listed = vw.cli("backups", g.name, "--json").json()
    assert [(p["id"], p["status"]) for p in listed if p["status"] == "complete"] == [(first, "complete")]
    assert [p["status"] for p in listed] == ["complete", "failed"]
    assert [p for p in share.rglob("*") if p.name.startswith(".tmp-")] == []
    assert not list(share.rglob(f"{listed[1]['id']}/*"))

    filler.unlink()
    r = _backup(vw, g.name)
    assert r.code == 0, r.err
    assert r.json()["result"]["level"] == "incremental"
    assert _restored_equal(vw, g, tmp_path, g.shadow_copy("vda", tmp_path / "now.raw"), "restored")


# --- format 2: a restore read from the chunks while S3 answers 503 ------------------------------
def _chunk_get(r) -> bool:
    return r.method == "GET" and "/chunks/" in r.target


def _vault_behind(proxy: FaultProxy, vw, request, tmp_path: Path, **settings) -> None:
    """A format-2 target ``vault`` in the test bucket, reached through ``proxy``
    (``settings`` added to its entry), its key made."""
    from tests.harness import FAST_KDF, add_format2_target

    add_format2_target(vw, "vault", "s3", request, tmp_path)
    vw.storage["vault"].update(endpoint_url=proxy.url, **settings)
    assert vw.cli("key", "init", "vault", "--chunk-size-kib", "256", *FAST_KDF).code == 0


def test_a_format2_restore_rides_out_a_slow_down_and_fails_clearly_when_s3_keeps_refusing(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path, request):
    """Chunks are read while qemu-img writes the image (an NBD export, one pass). A 503
    Slow Down answer is retried and the restore is bit for bit; an S3 that keeps
    answering 503 fails the restore with S3's error, not qemu-img's "Input/output error",
    and nothing is published."""
    _vault_behind(s3_fault_proxy, vw, request, tmp_path, max_attempts=2)  # each GET tried twice
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 2}
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    point_id = r.json()["result"]["point_id"]
    expected = g.shadow_copy("vda", tmp_path / "vda.raw")

    s3_fault_proxy.add(Rule(_chunk_get, "respond", times=1, status=503))
    out = tmp_path / "out"
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    assert len(s3_fault_proxy.handled("respond")) == 1
    assert images_equal(out / "vda.qcow2", expected)

    s3_fault_proxy.add(Rule(_chunk_get, "respond", times=100_000, status=503))
    refused = tmp_path / "refused"
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(refused), "--wait")
    assert r.code != 0, r.out
    assert "SlowDown" in r.err and "Input/output error" not in r.err, r.err
    [job] = [j for j in job_rows.recent(vw.catalog()) if j.kind == "restore" and j.state == "failed"]
    assert job.attempts == 2  # storage unreachable: retried, like any backend
    assert not refused.exists() or list(refused.iterdir()) == [], list(refused.iterdir())
    assert not list(vw.scratch.glob("job-*"))


# --- format 2: a repository on a mounted target that fills up -----------------------------
def test_a_format2_backup_that_fills_its_mounted_target_fails_clearly_and_leaves_nothing_listed(
        vw, guest_factory, small_filesystem: Path, tmp_path, request):
    """Chunks are written under temporary names and renamed once synced; the index and
    the manifest come after them. A target that fills up midway fails the backup as
    NoSpace with no temporary file left, no index or manifest of the failed point, and
    nothing listed as restorable beyond the point before. Once there is room, the next
    backup is an incremental of that point that restores bit for bit, and after a gc no
    chunk is left that no point uses."""
    from virtwarden.storage_backends.format2.access import open_repository

    from tests.harness import FAST_KDF, add_format2_target
    from virtwarden import config

    share = small_filesystem
    add_format2_target(vw, "vault", "nfs", request, tmp_path)
    vw.storage["vault"].update(path=str(share), create=False)
    assert vw.cli("key", "init", "vault", "--chunk-size-kib", "256", *FAST_KDF).code == 0
    g = guest_factory(disks=1, size_mib=128)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    first = r.json()["result"]["point_id"]

    filler = _fill(share, leave=24 * MiB)
    g.write_random("vda", 16 * MiB, 48 * MiB)  # twice the room left, in chunks none of them stored yet
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 6, r.err  # NoSpace: not retried, the target will not empty itself
    assert "storage 'vault': no space left" in r.err and "bytes free" in r.err, r.err
    listed = vw.cli("backups", g.name, "--json").json()
    assert [(p["id"], p["status"]) for p in listed] == [(first, "complete"), (listed[1]["id"], "failed")]
    failed = listed[1]["id"]
    assert [p for p in share.rglob("*") if p.name.startswith(".tmp-")] == []
    assert not [p for p in share.rglob("*") if failed in p.name], "an index or manifest of the failed point"
    repo = open_repository("vault", config.load(str(vw.write_config()), env={}).storage_target("vault"))
    assert [ref.point_id for ref in repo.points()] == [first]

    filler.unlink()
    expected = g.shadow_copy("vda", tmp_path / "now.raw")
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    assert r.json()["result"]["level"] == "incremental"
    assert _restored_equal(vw, g, tmp_path, expected, "restored")
    def collected() -> dict | None:  # the worker's own sweep may be collecting: then run it again later
        gc = vw.cli("storage", "gc", "vault", "--json")
        assert gc.code == 0, gc.err
        return None if gc.json()["deferred"] else gc.json()

    wait_for(collected, 60, "a gc that is not deferred", poll=0.5)
    assert repo.gc().deleted == 0, "gc left chunks no point uses"
    assert sorted(ref.point_id for ref in repo.points()) == sorted([first, r.json()["result"]["point_id"]])


def _chunk_put(r) -> bool:
    return r.method == "PUT" and "/chunks/" in r.target


def test_a_format2_chunk_whose_upload_is_cut_is_sent_again_and_the_backup_restores(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path, request):
    """The connection dropped halfway through a chunk's PUT (the endpoint received nothing
    of it): the chunk is sent again within the backup's first attempt, nothing partial is
    stored under its name, and the point restores bit for bit."""
    from virtwarden.catalog import jobs as job_rows

    _vault_behind(s3_fault_proxy, vw, request, tmp_path)
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    at_backup = g.shadow_copy("vda", tmp_path / "at-backup.raw")
    s3_fault_proxy.add(Rule(_chunk_put, "cut", times=2))
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    cut = s3_fault_proxy.handled("cut")
    assert len(cut) == 2
    for seen in cut:
        again = [s.action for s in s3_fault_proxy.requests(_chunk_put) if s.request.target == seen.request.target]
        assert again[-1] == "pass", again
    assert [j.attempts for j in job_rows.recent(vw.catalog()) if j.kind == "backup"] == [1]
    assert _restored_equal(vw, g, tmp_path, at_backup, "restored")


def test_a_format2_chunk_damaged_on_its_way_to_s3_is_sent_again_or_fails_the_backup_and_is_removed(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path, request):
    """One byte of a chunk flipped on its way to S3. An endpoint that checks the
    ``x-amz-checksum-sha256`` of a PUT (AWS S3, MinIO) refuses it with BadDigest; the
    moto endpoint of the test bed stores what arrived, and its ETag (the MD5 of what it
    stored) gives it away. Either way the chunk is sent again and the point restores bit
    for bit. When every attempt arrives damaged, the backup fails as ChecksumMismatch,
    lists nothing restorable and leaves no damaged object under the chunk's name (the
    next backup would take a chunk that is there as stored)."""
    _vault_behind(s3_fault_proxy, vw, request, tmp_path, max_attempts=2)
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    at_backup = g.shadow_copy("vda", tmp_path / "at-backup.raw")
    s3_fault_proxy.add(Rule(_chunk_put, "corrupt", times=1))
    worker = vw.start_worker()

    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    [damaged] = s3_fault_proxy.handled("corrupt")
    assert damaged.status in (200, 400), damaged  # stored damaged (moto) or refused (BadDigest)
    again = [s for s in s3_fault_proxy.requests(_chunk_put) if s.request.target == damaged.request.target]
    assert [s.action for s in again] == ["corrupt", "pass"], again
    assert _restored_equal(vw, g, tmp_path, at_backup, "restored")

    # every attempt of a chunk damaged: the backup fails and the object is gone
    worker.stop()
    vw.storage["vault"]["max_attempts"] = 1
    vw.start_worker()
    g.write_random("vda", 8 * MiB, 4 * MiB)
    s3_fault_proxy.add(Rule(_chunk_put, "corrupt", times=1))
    r = _backup(vw, g.name, "--target", "vault")
    [_, damaged] = s3_fault_proxy.handled("corrupt")
    if damaged.status == 200:  # moto: found by its ETag
        assert r.code == 6, r.err  # ChecksumMismatch: not retried
        assert "damaged in transit" in r.err and "storage 'vault'" in r.err and "was removed" in r.err, r.err
    else:
        assert r.code == 6 and "BadDigest" in r.err, r.err
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["complete", "failed"]
    key = damaged.request.target.split("?")[0].split("/", 2)[2]  # /bucket/key
    assert not s3_client(s3_settings.endpoint_url).list_objects_v2(Bucket=s3_settings.bucket, Prefix=key).get(
        "Contents"), f"{key} is still stored"
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    assert _restored_equal(vw, g, tmp_path, g.shadow_copy("vda", tmp_path / "now.raw"), "restored-2")


def _point_behind_proxy(vw, guest_factory, proxy: FaultProxy, request, tmp_path: Path):
    """A format-2 target on S3 through ``proxy``, a worker that tries a job twice, and
    one point of a guest with 4 MiB written; the guest and a copy of its disk then."""
    _vault_behind(proxy, vw, request, tmp_path)
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 2}
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    return g, g.shadow_copy("vda", tmp_path / "vda.raw")


def _objects(settings) -> int:
    return s3_client(settings.endpoint_url).list_objects_v2(Bucket=settings.bucket)["KeyCount"]


def test_a_format2_chunk_damaged_on_its_way_from_s3_is_read_again_not_taken_for_damage_in_storage(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path, request):
    """One byte of a chunk flipped on its way back from S3 (the endpoint sends no
    checksum the client checks; the object's own sha256 no longer matches). That is no
    proof the chunk is damaged in storage: verify reads it again, finds it intact and
    deletes nothing; a restore fails its attempt as the storage's trouble, and the retry
    restores bit for bit. Nothing is marked damaged."""
    from virtwarden.catalog import jobs as job_rows

    g, expected = _point_behind_proxy(vw, guest_factory, s3_fault_proxy, request, tmp_path)
    chunks = _objects(s3_settings)

    s3_fault_proxy.add(Rule(_chunk_get, "corrupt-reply", times=1))
    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code == 0, r.err + r.out
    assert len(s3_fault_proxy.handled("corrupt-reply")) == 1
    assert _objects(s3_settings) == chunks

    s3_fault_proxy.add(Rule(_chunk_get, "corrupt-reply", times=1))
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(tmp_path / "out"), "--wait")
    assert r.code == 0, r.err
    assert len(s3_fault_proxy.handled("corrupt-reply")) == 2
    assert images_equal(tmp_path / "out" / "vda.qcow2", expected)
    [job] = [j for j in job_rows.recent(vw.catalog()) if j.kind == "restore"]
    assert job.attempts == 2
    assert [p["status"] for p in vw.cli("backups", g.name, "--json").json()] == ["complete"]


def test_a_format2_chunk_whose_transfer_from_s3_is_cut_is_not_taken_for_damage(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path, request):
    """The connection dropped halfway through a chunk's body on its way back from S3 (a
    network failing mid-transfer, not a damaged object): the chunk is read again where
    it broke. Verify deletes and marks nothing; a restore succeeds bit for bit in its
    first attempt (before: the attempt failed and the whole restore started again); every
    point stays listed complete."""
    from virtwarden.catalog import jobs as job_rows

    g, expected = _point_behind_proxy(vw, guest_factory, s3_fault_proxy, request, tmp_path)
    chunks = _objects(s3_settings)

    s3_fault_proxy.add(Rule(_chunk_get, "cut-reply", times=2))
    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code == 0, r.err + r.out
    assert len(s3_fault_proxy.handled("cut-reply")) == 2
    assert _objects(s3_settings) == chunks
    assert not r.json()["result"].get("damaged"), r.out

    s3_fault_proxy.add(Rule(_chunk_get, "cut-reply", times=2))
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(tmp_path / "out"), "--wait")
    assert r.code == 0, r.err
    assert len(s3_fault_proxy.handled("cut-reply")) == 4
    assert images_equal(tmp_path / "out" / "vda.qcow2", expected)
    assert [j.attempts for j in job_rows.recent(vw.catalog()) if j.kind == "restore"] == [1]  # read again in place
    assert [p["status"] for p in vw.cli("backups", g.name, "--json").json()] == ["complete"]
    assert _objects(s3_settings) == chunks


def test_an_s3_artifact_damaged_on_its_way_is_read_again_by_verify_and_retried_by_restore(
        vw, guest_factory, s3_settings, s3_fault_proxy: FaultProxy, tmp_path):
    """One byte of a format-1 artifact flipped on its way back from S3: its SHA-256 does
    not match, a second read's does; so the storage is not blamed for damage (the point
    stays complete): verify passes, and the restore is tried again and is bit for bit."""
    vw.storage["s3"] = s3_storage_entry(s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 2}
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "s3")
    assert r.code == 0, r.err
    expected = g.shadow_copy("vda", tmp_path / "vda.raw")

    def artifact_get(q) -> bool:
        return q.method == "GET" and q.target.split("?")[0].endswith("/vda.qcow2")

    s3_fault_proxy.add(Rule(artifact_get, "corrupt-reply", times=1))
    s3_fault_proxy.add(Rule(lambda q: q.method == "GET" and q.target.split("?")[0].endswith("/manifest.json"),
                            "corrupt-reply", times=1))
    r = vw.cli("verify", g.name, "--wait", "--json")  # each read again: intact, nothing marked
    assert r.code == 0, r.err + r.out
    assert len(s3_fault_proxy.handled("corrupt-reply")) == 2
    s3_fault_proxy.add(Rule(artifact_get, "corrupt-reply", times=1))
    assert _restored_equal(vw, g, tmp_path, expected, "restored")
    assert len(s3_fault_proxy.handled("corrupt-reply")) == 3
    [job] = [j for j in job_rows.recent(vw.catalog()) if j.kind == "restore"]
    assert job.attempts == 2
    assert [p["status"] for p in vw.cli("backups", g.name, "--json").json()] == ["complete"]


def test_a_format2_restore_that_fills_its_directory_fails_clearly_and_leaves_nothing_there(
        vw, guest_factory, small_filesystem: Path, tmp_path, request):
    """A restore writes its images past the page cache where their filesystem allows
    (qemu-img ``-t none``). One into a directory whose filesystem fills up midway fails
    as NoSpace naming it, not retried, with no image, partial file or directory left
    there; once there is room the same restore succeeds bit for bit."""
    from tests.harness import FAST_KDF, add_format2_target

    add_format2_target(vw, "vault", "nfs", request, tmp_path)
    assert vw.cli("key", "init", "vault", *FAST_KDF).code == 0
    g = guest_factory(disks=1, size_mib=128)
    g.write_random("vda", 0, 48 * MiB)
    vw.start_worker()
    r = _backup(vw, g.name, "--target", "vault")
    assert r.code == 0, r.err
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")

    filler = _fill(small_filesystem, leave=16 * MiB)
    out = small_filesystem / "restored"
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(out), "--wait")
    assert r.code == 6, r.err + r.out  # NoSpace: not retried, the directory will not empty itself
    assert f"restoring vda.qcow2 into {out}: qemu-img convert: no space left" in r.err, r.err
    assert "bytes free there" in r.err, r.err
    assert not out.exists() or list(out.rglob("*")) == [], list(out.rglob("*"))
    assert [p for p in small_filesystem.iterdir() if p.name not in ("filler", "lost+found", "restored")] == []

    filler.unlink()
    r = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(small_filesystem / "again"), "--wait")
    assert r.code == 0, r.err
    image = small_filesystem / "again" / "vda.qcow2"
    cached = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(image)],
                            capture_output=True, text=True, check=True).stdout
    assert int(cached) < 4 * MiB, cached  # of the 48 MiB written: past the page cache
    assert images_equal(image, expected)


def test_a_chunk_stored_without_a_lookup_and_damaged_on_its_way_is_replaced_by_its_next_attempt(
        s3_settings, s3_fault_proxy: FaultProxy, tmp_path):
    """A run of new data is stored with conditional PUTs (``If-None-Match: *``, no lookup
    first). The first of them has a byte flipped on its way; moto stores it as it came
    (its ETag gives it away), so the object under that name is this PUT's own, damaged:
    the next attempt replaces it unconditionally, and every chunk then opens with its
    id checked and the disk reads back bit for bit."""
    from virtwarden.storage_backends.format2.keys import RepositoryKey
    from virtwarden.storage_backends.format2.objects import Codec
    from virtwarden.storage_backends.format2.store import ChunkStore, read_disk, write_disk
    from virtwarden.storage_backends.s3 import S3Backend

    settings = s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url})
    store = ChunkStore(S3Backend("vault", settings), Codec(RepositoryKey.generate()))
    s3_fault_proxy.add(Rule(lambda r: _chunk_put(r) and "if-none-match" in r.headers, "corrupt", times=1))
    size, chunk = 96 * MiB, 512 * 1024
    data = os.urandom(size)
    index, stats = write_disk(store, "vda", lambda offset, length: data[offset:offset + length], size, chunk)
    assert stats.stored_chunks == size // chunk
    [damaged] = s3_fault_proxy.handled("corrupt")
    again = [s for s in s3_fault_proxy.requests(_chunk_put) if s.request.target == damaged.request.target]
    assert [(s.action, "if-none-match" in s.request.headers) for s in again] == [("corrupt", True), ("pass", False)]
    for cid in filter(None, index.chunks):
        store.get(cid, check_id=True)
    out = bytearray(size)

    def write_at(offset: int, piece: bytes) -> None:
        out[offset:offset + len(piece)] = piece

    read_disk(store, index, write_at)
    assert out == data


NOT_IMPLEMENTED = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NotImplemented</Code>"
                   b"<Message>A header you provided implies functionality that is not implemented</Message></Error>")


def test_an_endpoint_without_conditional_writes_gets_a_lookup_then_a_put_for_each_new_chunk(
        s3_settings, s3_fault_proxy: FaultProxy, tmp_path):
    """An S3-compatible endpoint that refuses ``If-None-Match`` on a PUT (501
    NotImplemented) is not asked again: the chunks the run of new data would have stored
    without a lookup are looked up, then stored, and the disk reads back bit for bit."""
    from virtwarden.storage_backends.format2.keys import RepositoryKey
    from virtwarden.storage_backends.format2.objects import Codec
    from virtwarden.storage_backends.format2.store import ChunkStore, read_disk, write_disk
    from virtwarden.storage_backends.s3 import S3Backend

    settings = s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url})
    backend = S3Backend("vault", settings)
    store = ChunkStore(backend, Codec(RepositoryKey.generate()))
    s3_fault_proxy.add(Rule(lambda r: _chunk_put(r) and "if-none-match" in r.headers, "respond", times=10**6,
                            status=501, body=NOT_IMPLEMENTED))
    size, chunk = 96 * MiB, 512 * 1024
    data = os.urandom(size)
    index, stats = write_disk(store, "vda", lambda offset, length: data[offset:offset + length], size, chunk)
    assert stats.stored_chunks == size // chunk
    refused = s3_fault_proxy.handled("respond")
    assert 1 <= len(refused) <= 2 * store.workers  # those under way when the first refusal came back
    heads = [s for s in s3_fault_proxy.recorded() if s.request.method == "HEAD"]
    assert len(heads) > size // chunk - len(refused) - 70  # the first 64 and every chunk after the refusal
    out = bytearray(size)

    def write_at(offset: int, piece: bytes) -> None:
        out[offset:offset + len(piece)] = piece

    read_disk(store, index, write_at)
    assert out == data
