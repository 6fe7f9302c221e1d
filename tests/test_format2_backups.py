"""Backups to a format-2 target, end to end: a real guest, a real worker, the local
directory and the S3 endpoint. Every point restores bit for bit, incrementals read only
what changed, any older point can be pruned (no chain holds it), gc reclaims its
chunks, what the guest wrote is not readable in storage, and a damaged chunk is found
by verify and refused by restore with the point, disk and offset named."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from virtwarden.storage_backends.format2.access import open_repository

from tests.guests import images_equal
from tests.harness import FAST_KDF, add_format2_target, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024
MARKER = b"VW-F2-GUEST-MARKER-5c3e9a"


# What the hypervisor side does (pull mode, shut-off reads, a worker killed mid-job) is
# the same whatever the backend: those tests run on the directory only.
ONE_BACKEND = pytest.mark.parametrize("vault", ["nfs"], indirect=True)


@pytest.fixture(params=["nfs", "s3"])
def vault(request, vw, tmp_path: Path):
    """A format-2 target ``vault`` with its key made, and a policy ``p`` backing up to it
    (bitmap strategy; ``_keep_last`` gives it a retention). Scratch space on a short path,
    as in production: QEMU's NBD socket of a pull-mode backup lives there."""
    add_format2_target(vw, "vault", request.param, request, tmp_path)
    scratch = Path(tempfile.mkdtemp(prefix="vw-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    vw.hosts["local"]["scratch_dir"] = str(scratch)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    _keep_last(pdir, None)
    vw.extra["policy_dir"] = str(pdir)
    r = vw.cli("key", "init", "vault", "--chunk-size-kib", "256", *FAST_KDF)
    assert r.code == 0, r.err
    return vw


def _keep_last(pdir: Path, n: int | None, strategy: str = "bitmap") -> None:
    retention = f"    retention:\n      keep_last: {n}\n" if n else ""
    (pdir / "p.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: p\n"
        f"spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: vault\n    strategy: {strategy}\n"
        + retention)


def _repo(vw):
    from virtwarden import config

    return open_repository("vault", config.load(str(vw.write_config()), env={}).storage_target("vault"))


def _stored_bytes(repo) -> list[bytes]:
    return [repo.backend.get_bytes(info.key) for info in repo.backend.list("")]


def _flip_a_bit(repo, key: str) -> None:
    """Damage a stored object in place, as bit rot on the storage would."""
    blob = bytearray(repo.backend.get_bytes(key))
    blob[len(blob) // 2] ^= 0x20
    repo.backend.put_bytes(key, bytes(blob))


def _backup(vw, g) -> dict:
    r = vw.cli("backup", g.name, "--target", "vault", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    return r.json()["result"]


def _restore(vw, g, point_id: str, out: Path) -> Path:
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err + r.out
    return out


@pytest.mark.parametrize("strategy", ["bitmap", "blockcommit"])
def test_every_point_restores_bit_for_bit_and_any_older_point_can_go(vault, guest_factory, tmp_path,
                                                                     strategy) -> None:
    """Both strategies: a full, then incrementals that read only what changed (a push-mode
    target's clusters, or the frozen overlay's)."""
    vw = vault
    _keep_last(tmp_path / "policies", None, strategy)
    g = guest_factory(disks=2, size_mib=64)
    g.write_random("vda", 0, 8 * MiB)
    marked = tmp_path / "marked.bin"
    marked.write_bytes((MARKER * (MiB // len(MARKER) + 1))[:MiB])  # compressible, and findable if stored plain
    g.write("vda", 20 * MiB, MiB, data_file=marked)
    g.write("vdb", 0, 4 * MiB, pattern=0x11)
    vw.start_worker()

    made, expected = [], []
    for n, writes in enumerate([[], [("vda", 3 * MiB + 4096, 100 * 1024), ("vdb", 40 * MiB, MiB)],
                                [("vda", 50 * MiB, 2 * MiB)]]):
        for target, offset, length in writes:
            g.write_random(target, offset, length)
        result = _backup(vw, g)
        assert (result["format"], result["level"]) == (2, "full" if n == 0 else "incremental"), result
        made.append(result["point_id"])
        expected.append({t: g.shadow_copy(t, tmp_path / f"expected-{n}-{t}.raw") for t in ("vda", "vdb")})

    repo = _repo(vw)
    assert all(MARKER not in blob for blob in _stored_bytes(repo))  # nor the domain's name:
    assert not [info.key for info in repo.backend.list("") if g.name in info.key]
    for n, point_id in enumerate(made):
        out = _restore(vw, g, point_id, tmp_path / f"restored-{n}")
        for t in ("vda", "vdb"):
            assert images_equal(out / f"{t}.qcow2", expected[n][t]), (n, t)

    # a policy that selects by metadata reads the newest point's manifest: format 2 too
    (tmp_path / "policies" / "meta.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: meta\n"
        "spec:\n  selector:\n    metadata: {tier: gold}\n  backup:\n    target: vault\n")
    r = vw.cli("prune", g.name, "--dry-run")
    assert r.code == 0, r.err + r.out
    (tmp_path / "policies" / "meta.yaml").unlink()

    # keep_last 1: the two older points go (no chain holds them); nobody runs gc, the
    # worker's sweep submits it and it reclaims their chunks
    before = sum(info.size for info in repo.backend.list("chunks/"))
    _keep_last(tmp_path / "policies", 1, strategy)
    r = vw.cli("prune", g.name, "--policy", "p", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["id"] for p in listed if p["status"] == "complete"] == [made[2]]
    gc_job = _collected(vw)
    assert gc_job["deferred"] is None and gc_job["deleted"] > 0 and gc_job["points"] == 1, gc_job
    left = list(repo.backend.list("chunks/"))
    assert sum(info.size for info in left) < before
    assert gc_job["stored_bytes"] == sum(info.size for info in left)
    assert repo.gc().deleted == 0, "the automatic gc left nothing unused"
    out = _restore(vw, g, made[2], tmp_path / "restored-after-gc")
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", expected[2][t]), t


def _unused_chunks(vw, g):
    """Two points of ``g`` (a worker started), the older deleted from the repository as
    prune does (catalog aside): its chunks that the newer does not share are unused.
    The repository and the newer point's id."""
    g.write_random("vda", 0, 8 * MiB)
    vw.start_worker()
    old = _backup(vw, g)["point_id"]
    g.write_random("vda", 0, 4 * MiB)  # the old point's chunks there are now its alone
    kept = _backup(vw, g)["point_id"]
    repo = _repo(vw)
    repo.delete_point(repo.ref(g.name, old))
    return repo, kept


def _collected(vw) -> dict:
    """The result of the gc job the worker's sweep submitted, once it succeeded, checked
    against what /metrics says of the repository."""
    from virtwarden.catalog import repositories

    from virtwarden.api.metrics import CatalogCollector

    cat = vw.catalog()
    try:
        def done():
            found = [j for j in vw.cli("jobs", "--json").json() if j["kind"] == "gc" and j["state"] == "succeeded"]
            return found[0] if found else None

        job = wait_for(done, 60, "the gc job the sweep submits after a prune")
        assert job["requested_by"] == "sweep"
        assert repositories.due_for_gc(cat, 0.001) == [], "nothing left to collect"
        series = {(s.name, s.labels.get("storage")): s.value for m in CatalogCollector(cat).collect()
                  for s in m.samples}
        result = job["result"]
        assert series[("virtwarden_repository_stored_bytes", "vault")] == result["stored_bytes"]
        assert series[("virtwarden_repository_points", "vault")] == 1
        assert series[("virtwarden_repository_gc_deleted_bytes_total", "vault")] == result["deleted_bytes"]
        assert series[("virtwarden_repository_garbage_age_seconds", "vault")] == 0
        return result
    finally:
        cat.close()


def _a_point_with_a_damaged_chunk(vw, guest_factory):
    """A guest with 2 MiB of data, a worker, one full point, and its first chunk
    damaged in storage (a bit flipped): (guest, point id, repository, the chunk's offset
    in the disk, its id)."""
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 2 * MiB)
    vw.start_worker()
    point_id = _backup(vw, g)["point_id"]
    repo = _repo(vw)
    [index] = repo.indexes(repo.ref(g.name, point_id))
    offset, _, cid = next(piece for piece in index.pieces() if piece[2] is not None)
    _flip_a_bit(repo, repo.chunks.key(cid))
    return g, point_id, repo, offset, cid


def test_a_damaged_chunk_is_found_by_verify_or_by_restore_and_the_next_backup_repairs_it(vault, guest_factory,
                                                                                          tmp_path) -> None:
    """A chunk damaged in storage (bit rot). Verify finds it, deletes it and takes the
    point out of service; the next backup, a full, stores the chunk again. A restore that
    meets such a chunk before any verification refuses, naming point, disk and offset,
    and then does what verify does: the point is damaged, the chunk deleted, and the next
    backup repairs it (before, the point stayed complete and the domain's incrementals
    went on naming the damaged chunk)."""
    vw = vault
    g, point_id, repo, _offset, cid = _a_point_with_a_damaged_chunk(vw, guest_factory)
    key = repo.chunks.key(cid)

    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code != 0
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["damaged"]
    assert not repo.backend.exists(key)  # deleted: the next backup of that data stores it again
    again = _backup(vw, g)
    assert again["level"] == "full"  # a damaged point is never continued from
    out = _restore(vw, g, again["point_id"], tmp_path / "repaired")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))
    assert repo.backend.exists(key)

    # now found by a restore
    [index] = repo.indexes(repo.ref(g.name, again["point_id"]))
    offset, _, cid = [piece for piece in index.pieces() if piece[2] is not None][-1]
    key = repo.chunks.key(cid)
    _flip_a_bit(repo, key)
    r = vw.cli("restore", g.name, "--point", again["point_id"], "--to-dir", str(tmp_path / "out"), "--wait")
    assert r.code != 0
    assert f"restore point {again['point_id']}: vda at offset {offset}: chunk {cid}: authentication failed" in r.err
    assert not (tmp_path / "out" / "vda.qcow2").exists()
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["damaged", "damaged"]
    assert "found damaged or missing by restore job" in listed[1]["damage"], listed[1]
    assert not repo.backend.exists(key)
    g.write_random("vda", 8 * MiB, 64 * 1024)
    third = _backup(vw, g)
    assert third["level"] == "full"
    out = _restore(vw, g, third["point_id"], tmp_path / "repaired-2")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now-2.raw"))
    assert repo.backend.exists(key)


@ONE_BACKEND
def test_a_damaged_chunk_a_restore_cannot_delete_is_stored_again_by_the_next_backup(vault, guest_factory,
                                                                                    tmp_path) -> None:
    """A restore meets a damaged chunk and may not delete it (as with credentials that
    only read; here its folder is immutable, ``chattr +i``, which root cannot get round):
    storage goes on saying the chunk is there. Before, the next backup took its word,
    named the damaged chunk without storing it, and published a complete point that did
    not restore. Now the catalog remembers the chunk and the next backup stores it again."""
    import subprocess

    from virtwarden.catalog import repositories

    from tests.conftest import need
    from virtwarden.api.metrics import CatalogCollector

    need(shutil.which("chattr") is not None, "chattr is not installed (e2fsprogs)")
    vw = vault
    g, point_id, repo, offset, cid = _a_point_with_a_damaged_chunk(vw, guest_factory)
    key = repo.chunks.key(cid)
    folder = repo.backend._path(key).parent
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(tmp_path / "out"), "--wait")
        assert r.code != 0
        assert f"vda at offset {offset}: chunk {cid}: authentication failed" in r.err
        assert repo.backend.exists(key)  # still there, still damaged
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert [p["status"] for p in vw.cli("backups", g.name, "--json").json()] == ["damaged"]
    cat = vw.catalog()
    assert repositories.damaged_chunks(cat, "vault") == {cid}
    series = {(s.name, s.labels.get("storage")): s.value for m in CatalogCollector(cat).collect() for s in m.samples}
    assert series[("virtwarden_repository_damaged_chunks", "vault")] == 1

    again = _backup(vw, g)
    assert again["level"] == "full"
    out = _restore(vw, g, again["point_id"], tmp_path / "repaired")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))
    assert repositories.damaged_chunks(cat, "vault") == frozenset()
    assert repo.chunks.get(cid)  # intact now
    assert not [s for m in CatalogCollector(cat).collect() for s in m.samples
                if s.name == "virtwarden_repository_damaged_chunks"]

    # Found by a verification this time: the same (before, the refused delete came out
    # as a storage error, and the point was not marked damaged).
    _flip_a_bit(repo, key)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        assert vw.cli("verify", g.name, "--wait").code != 0
        assert repo.backend.exists(key)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["damaged", "damaged"]
    assert "authentication failed" in listed[1]["damage"], listed[1]
    assert repositories.damaged_chunks(cat, "vault") == {cid}
    third = _backup(vw, g)
    out = _restore(vw, g, third["point_id"], tmp_path / "repaired-2")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now-2.raw"))
    assert repositories.damaged_chunks(cat, "vault") == frozenset()

    # Storage that refuses the chunk written again as well: the backup fails, and no
    # point naming the damaged chunk is listed complete.
    _flip_a_bit(repo, key)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        assert vw.cli("verify", g.name, "--wait").code != 0
        r = vw.cli("backup", g.name, "--target", "vault", "--wait")
        assert r.code != 0 and "Operation not permitted" in r.err, r.err
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert "complete" not in [p["status"] for p in vw.cli("backups", g.name, "--json").json()]
    assert repositories.damaged_chunks(cat, "vault") == {cid}


@ONE_BACKEND
def test_an_incremental_that_meets_its_parents_chunk_damaged_takes_it_out_of_service_and_retries_as_a_full(
        vault, guest_factory, tmp_path) -> None:
    """A blockcommit incremental lays a partial change over the previous point's chunk,
    which it must read. Damaged in storage, that chunk failed every attempt and every
    later backup the same way until someone verified. Now the attempt marks the points
    using it damaged (as verify would), deletes the chunk and fails as transient; the
    retry, its parent out of service, is a full."""
    from virtwarden.catalog import jobs

    vw = vault
    _keep_last(tmp_path / "policies", None, "blockcommit")
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    first = _backup(vw, g)
    assert first["level"] == "full"
    repo = _repo(vw)
    [index] = repo.indexes(repo.ref(g.name, first["point_id"]))
    cid = index.chunks[MiB // index.chunk_size]
    assert cid is not None
    _flip_a_bit(repo, repo.chunks.key(cid))

    g.write_random("vda", MiB + 8192, 4096)  # a piece of that chunk: the rest comes from the stored one
    r = vw.cli("backup", g.name, "--target", "vault", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    job = jobs.get(vw.catalog(), r.json()["id"])
    second = r.json()["result"]
    assert (second["level"], job.attempts) == ("full", 2), (second, job.attempts)
    listed = {p["id"]: p for p in vw.cli("backups", g.name, "--json").json()}
    assert listed[first["point_id"]]["status"] == "damaged"
    assert "found damaged or missing by backup job" in listed[first["point_id"]]["damage"]
    assert not repo.backend.exists(repo.chunks.key(cid))  # deleted; the guest no longer holds that data
    out = _restore(vw, g, second["point_id"], tmp_path / "second")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))


@ONE_BACKEND
def test_a_full_after_a_lost_checkpoint_trusts_the_last_point_and_an_asked_for_full_stores_what_was_lost(
        vault, guest_factory, tmp_path) -> None:
    """A full the planner chose (the checkpoint went) takes the chunks the last point
    names as stored, as an incremental does, and looks up only the others (on S3 a HEAD
    request each); a full the operator asks for looks every chunk up, so it stores again
    what storage lost without anyone noticing yet."""
    vw = vault
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    first = _backup(vw, g)["point_id"]
    repo = _repo(vw)
    key = repo.chunks.key(repo.indexes(repo.ref(g.name, first))[0].chunks[1])
    repo.backend.delete(key)  # lost by the storage; no verify has run
    for checkpoint in g.dom.listAllCheckpoints():
        checkpoint.delete()

    second = _backup(vw, g)
    assert second["level"] == "full"
    assert not repo.backend.exists(key)
    r = vw.cli("backup", g.name, "--target", "vault", "--full", "--wait", "--json")
    assert r.code == 0, r.err
    assert r.json()["result"]["level"] == "full"
    assert repo.backend.exists(key)  # stored again: every point that names it restores again
    out = _restore(vw, g, first, tmp_path / "first")
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))


@ONE_BACKEND
def test_verify_reads_each_chunk_points_share_once(vault, guest_factory, tmp_path) -> None:
    """Points share most of their chunks: a verification of all of them reads and checks
    each chunk once, not once per point that names it."""
    vw = vault
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    first = _backup(vw, g)["point_id"]
    g.write_random("vda", 8 * MiB, 64 * 1024)
    second = _backup(vw, g)["point_id"]
    repo = _repo(vw)
    pieces = {cid: length for point in (first, second) for index in repo.indexes(repo.ref(g.name, point))
              for _offset, length, cid in index.pieces() if cid is not None}
    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code == 0, r.err
    result = r.json()["result"]
    assert sorted(result["verified"]) == sorted([first, second])
    assert (result["artifacts"], result["bytes_read"]) == (len(pieces), sum(pieces.values()))


@ONE_BACKEND
def test_a_repository_whose_chunks_are_named_by_hmac_keeps_that_through_backups_verify_and_restores(
        vault, guest_factory, tmp_path) -> None:
    """A repository created before chunk ids were recorded (its config as that code
    wrote it: no ``chunk_ids``, sealed as version 1) names its chunks by HMAC-SHA256 for
    life. Today's worker backs it up (a second full of unchanged data stores nothing: it
    finds the chunks by their HMAC names), verify checks every chunk's id and finds all
    intact, and every point restores bit for bit."""
    import hashlib
    import hmac
    import json

    from virtwarden.storage_backends.format2.objects import HMAC_SHA256, Codec
    from virtwarden.storage_backends.format2.repository import CONFIG_KEY

    vw = vault
    repo = _repo(vw)
    config = {k: v for k, v in repo.config.items() if k != "chunk_ids"}
    old = Codec(repo.codec.key, ids=HMAC_SHA256)
    repo.backend.put_bytes(CONFIG_KEY, old.seal("config", CONFIG_KEY, json.dumps(config).encode()))
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 4 * MiB)
    vw.start_worker()
    made, expected = [], []
    for n, writes in enumerate([[], [(8 * MiB, 64 * 1024)]]):
        for offset, length in writes:
            g.write_random("vda", offset, length)
        made.append(_backup(vw, g)["point_id"])
        expected.append(g.shadow_copy("vda", tmp_path / f"expected-{n}.raw"))
    again = vw.cli("backup", g.name, "--target", "vault", "--full", "--wait", "--json")
    assert again.code == 0, again.err
    made.append(again.json()["result"]["point_id"])
    expected.append(expected[-1])

    assert next(p for p in vw.cli("backups", g.name, "--json").json() if p["id"] == made[2])["size_bytes"] < MiB
    repo = _repo(vw)  # read afresh, as a new process would
    first = repo.indexes(repo.ref(g.name, made[0]))[0]
    cid = next(c for c in first.chunks if c)
    data = repo.chunks.get(cid, check_id=False)
    assert cid == hmac.new(repo.codec.key.ids, data, hashlib.sha256).hexdigest()
    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code == 0, r.err
    assert sorted(r.json()["result"]["verified"]) == sorted(made) and not r.json()["result"].get("damaged")
    assert "chunk_ids" not in repo.config and repo.codec.ids == HMAC_SHA256  # set once the config is read
    for n, point_id in enumerate(made):
        out = _restore(vw, g, point_id, tmp_path / f"restored-{n}")
        assert images_equal(out / "vda.qcow2", expected[n]), n


@ONE_BACKEND
def test_a_chunk_found_damaged_takes_every_point_that_uses_it_out_of_service(vault, guest_factory, tmp_path) -> None:
    """Two domains cloned from one template share their chunks. Verifying one of them
    finds a shared chunk damaged and deletes it: the other domain's point names it too,
    so it is damaged with it, and that domain's next backup is a full, which stores the
    chunk again. (An incremental would have taken the chunk's id from the point without
    reading its data, and published a point that cannot be restored.)"""
    vw = vault
    template = tmp_path / "template.bin"
    template.write_bytes(os.urandom(4 * MiB))
    a, b = guest_factory(disks=1, size_mib=16), guest_factory(disks=1, size_mib=16)
    for g in (a, b):
        g.write("vda", 0, 4 * MiB, data_file=template)
    vw.start_worker()
    point_a, point_b = _backup(vw, a)["point_id"], _backup(vw, b)["point_id"]
    repo = _repo(vw)
    cid = repo.indexes(repo.ref(a.name, point_a))[0].chunks[0]  # the template's first piece
    assert cid in repo.indexes(repo.ref(b.name, point_b))[0].referenced()
    key = repo.chunks.key(cid)
    _flip_a_bit(repo, key)

    r = vw.cli("verify", a.name, "--wait", "--json")  # b is not in its scope
    assert r.code != 0
    assert not repo.backend.exists(key)
    for g in (a, b):
        assert [p["status"] for p in vw.cli("backups", g.name, "--json").json()] == ["damaged"], g.name
    assert f"uses chunk {cid}" in r.err + r.out

    b.write_random("vda", 8 * MiB, 64 * 1024)
    again = _backup(vw, b)
    assert again["level"] == "full"
    out = _restore(vw, b, again["point_id"], tmp_path / "b")
    assert images_equal(out / "vda.qcow2", b.shadow_copy("vda", tmp_path / "b.raw"))
    assert repo.backend.exists(key)  # stored again: a's point, damaged in the catalog, reads whole again
    r = vw.cli("storage", "restore", "vault", point_a, "--to-dir", str(tmp_path / "a"), in_process=False)
    assert r.code == 0, r.err
    assert images_equal(tmp_path / "a" / "vda.qcow2", a.shadow_copy("vda", tmp_path / "a.raw"))


def test_a_point_restores_with_the_catalog_deleted_then_rebuilt_and_clones_share_their_chunks(vault, guest_factory,
                                                                                 tmp_path) -> None:
    vw = vault
    template = tmp_path / "template.bin"
    template.write_bytes(os.urandom(16 * MiB))
    a, b = guest_factory(disks=1, size_mib=32), guest_factory(disks=1, size_mib=32)
    for g in (a, b):
        g.write("vda", 0, 16 * MiB, data_file=template)
    b.write_random("vda", 5 * MiB, 4096)  # the clone has its own host name, say
    vw.start_worker()
    _backup(vw, a)
    first = vw.cli("storage", "stats", "vault", "--json").json()
    point_b = _backup(vw, b)["point_id"]
    both = vw.cli("storage", "stats", "vault", "--json").json()
    assert both["stored_bytes_all"] - first["stored_bytes_all"] <= 0.05 * first["stored_bytes_all"]
    assert both["domains"][b.name]["logical_bytes"] == 16 * MiB and both["dedup_ratio"] >= 1.9
    assert both["chunk_ids"] == "blake3"

    # No catalog, no worker: the storage and the key. The database goes with its WAL and
    # shared-memory files (a lost disk loses all three; a new catalog.db beside the old
    # -shm would truncate the file that a connection of this process still maps: SIGBUS).
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (vw.data_dir / name).unlink(missing_ok=True)
    vw.close()
    listed = vw.cli("storage", "points", "vault", "--domain", b.name, "--json")
    assert listed.code == 0, listed.err
    assert [p["id"] for p in listed.json()] == [point_b]
    r = vw.cli("storage", "restore", "vault", point_b, "--to-dir", str(tmp_path / "out"), in_process=False)
    assert r.code == 0, r.err
    assert images_equal(tmp_path / "out" / "vda.qcow2", b.shadow_copy("vda", tmp_path / "b.raw"))
    assert "<name>" + b.name + "</name>" in (tmp_path / "out" / "domain.xml").read_text()
    r = vw.cli("storage", "restore", "vault", point_b, "--to-dir", str(tmp_path / "out"))
    assert r.code != 0 and "is not an empty directory" in r.err

    # and the catalog is rebuilt from the manifests: the normal restore works again
    r = vw.cli("catalog", "rebuild", "--storage", "vault", "--json")
    assert r.code == 0, r.err + r.out
    assert sorted(p["domain"] for p in r.json()["imported"]) == sorted([a.name, b.name])
    vw.workers.clear()
    vw.start_worker()
    out = _restore(vw, b, point_b, tmp_path / "after-rebuild")
    assert images_equal(out / "vda.qcow2", tmp_path / "b.raw")


def test_gc_while_a_backup_writes_deletes_none_of_its_chunks(vault, guest_factory, tmp_path) -> None:
    """Two processes: the backup stopped in the middle of storing its chunks (its index
    not written yet), and gc run beside it. gc defers; the backup then finishes and its
    point restores bit for bit; gc run again deletes only what no point uses."""
    from tests.faults import pause_env, stopped_at

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    faults = tmp_path / "faults"
    worker = vw.start_worker(env=pause_env("storing", faults))
    r = vw.cli("backup", g.name, "--target", "vault", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at("storing", faults)
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")

    gc = vw.cli("storage", "gc", "vault", "--json", in_process=False)
    assert gc.code == 0, gc.err
    assert gc.json()["deleted"] == 0 and "1 backup(s) under way" in gc.json()["deferred"]
    worker.resume()
    from virtwarden.catalog import jobs

    done = wait_for(lambda: (j := jobs.get(vw.catalog(), job_id)).finished and j, 60, "the backup")
    assert done.state == "succeeded", done.error
    gc = vw.cli("storage", "gc", "vault", "--json", in_process=False)
    assert gc.json()["deferred"] is None and gc.json()["deleted"] == 0
    out = _restore(vw, g, done.result["point_id"], tmp_path / "out")
    assert images_equal(out / "vda.qcow2", expected)


@contextmanager
def _gc_stopped_midway(vw, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """A real ``storage gc`` process (``env`` added to its environment) stopped in the
    middle of its deletions while the block runs, holding its marker; continued at the
    end, and it must have deleted something."""
    import signal
    import threading

    from tests.faults import pause_env, stopped_at

    faults = tmp_path / "faults"
    ran: list = []
    gc = threading.Thread(target=lambda: ran.append(vw.cli("storage", "gc", "vault", "--json", in_process=False,
                                                           env={**pause_env("gc-deleting", faults), **(env or {})})))
    gc.start()
    gc_pid = stopped_at("gc-deleting", faults)
    try:
        yield
    finally:
        os.kill(gc_pid, signal.SIGCONT)
        gc.join(60)
    assert ran and ran[0].code == 0 and ran[0].json()["deleted"] > 0, ran


def _waits_for_gc(vw, job_id: str):
    """The backup job ``job_id`` once it says it waits for gc."""
    from virtwarden.catalog import jobs

    return wait_for(lambda: (j := jobs.get(vw.catalog(), job_id)).progress_text and "gc is running" in
                    j.progress_text and j, 30, "the backup to wait for gc")


def _succeeds_first_time_and_restores(vw, g, job_id: str, tmp_path: Path) -> None:
    from virtwarden.catalog import jobs

    done = wait_for(lambda: (j := jobs.get(vw.catalog(), job_id)).finished and j, 60, "the backup")
    assert (done.state, done.attempts) == ("succeeded", 1), done.error
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")
    out = _restore(vw, g, done.result["point_id"], tmp_path / "out")
    assert images_equal(out / "vda.qcow2", expected)


@ONE_BACKEND
def test_a_backup_that_meets_a_running_gc_waits_for_it_and_spends_no_attempt(vault, guest_factory, tmp_path) -> None:
    """gc (another process, with unused chunks to delete) stopped in the middle of its
    deletions, holding its marker, while a backup starts: the backup waits on its first
    attempt, longer than its three attempts would have lasted (retries 1 s apart here),
    and succeeds once gc ends; its point restores bit for bit. A second gc started
    meanwhile defers (before, it ran, and its end removed the one marker they shared:
    the backup went ahead while the first gc still deleted what it had found unused)."""
    from virtwarden.catalog import jobs

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    _unused_chunks(vw, g)
    with _gc_stopped_midway(vw, tmp_path):
        g.write_random("vda", 16 * MiB, MiB)
        r = vw.cli("backup", g.name, "--target", "vault", "--json")
        assert r.code == 0, r.err
        job_id = r.json()["id"]
        waiting = _waits_for_gc(vw, job_id)
        # a second gc meanwhile defers and leaves the first one's marker where it is
        second = vw.cli("storage", "gc", "vault", "--json", in_process=False)
        assert second.code == 0 and second.json()["deferred"].startswith("another gc is running"), second.out
        time.sleep(3.5)  # three attempts (retries 1 s, then 2 s later) would have failed by now
        job = jobs.get(vw.catalog(), job_id)
        assert (job.state, job.attempts) == ("running", 1), (job.state, job.attempts, job.error)
        assert waiting.attempts == 1
    _succeeds_first_time_and_restores(vw, g, job_id, tmp_path)


def test_a_gc_on_a_machine_whose_clock_runs_20_minutes_behind_still_keeps_backups_off(vault, guest_factory,
                                                                                     tmp_path) -> None:
    """A gc marker's age was judged by the clock of the machine that wrote it: from a gc
    host 20 minutes behind (more than the 10 minutes after which a marker counts as
    dead), a live gc's marker looked dead and a backup went ahead, free to name chunks
    that gc was deleting. Now the storage's own time of the marker counts too: the
    backup waits for that gc (libfaketime on a real gc process) and restores bit for
    bit once it has ended."""
    import json

    from virtwarden.catalog import jobs

    from tests.faults import faketime_env

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    repo, _kept = _unused_chunks(vw, g)
    with _gc_stopped_midway(vw, tmp_path, faketime_env("-20m")):
        [marker] = [i.key for i in repo.backend.list("gc/")]
        written = json.loads(repo.codec.open("marker", marker, repo.backend.get_bytes(marker)))["at"]
        assert time.time() - written > 19 * 60, "the gc's clock is not behind: libfaketime did not take"
        g.write_random("vda", 16 * MiB, MiB)
        r = vw.cli("backup", g.name, "--target", "vault", "--json")
        assert r.code == 0, r.err
        job_id = r.json()["id"]
        _waits_for_gc(vw, job_id)
        assert not jobs.get(vw.catalog(), job_id).finished
    _succeeds_first_time_and_restores(vw, g, job_id, tmp_path)


@ONE_BACKEND
def test_a_worker_killed_while_qemu_img_reads_from_the_chunks_leaves_nothing_and_the_retry_restores(
        vault, guest_factory, tmp_path) -> None:
    """SIGKILL of the worker in the middle of a restore's one pass (the export answered a
    read, qemu-img is writing the image): qemu-img loses its source and stops, nothing
    half-written appears in the destination, and the retry restores bit for bit."""
    from virtwarden.catalog import jobs as job_rows
    from virtwarden.storage_backends.format2.nbd import SERVING

    from tests.faults import kill_env

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 24 * MiB)
    vw.start_worker()
    point_id = _backup(vw, g)["point_id"]
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")
    vw.close(graceful=False)
    vw.workers.clear()
    cat = vw.catalog()
    dying = vw.start_worker(env=kill_env(SERVING, tmp_path / "faults"))
    out = tmp_path / "out"
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(out), "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    wait_for(lambda: (tmp_path / "faults" / f"{SERVING}.pid").exists(), 120, "the worker to die mid-restore")
    dying.kill()
    assert not (out / "vda.qcow2").exists()
    vw.start_worker()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the retry to finish")
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert sorted(p.name for p in out.iterdir()) == ["domain.xml", "vda.qcow2"]
    assert images_equal(out / "vda.qcow2", expected)
    assert not list(vw.scratch.glob("job-*")), list(vw.scratch.iterdir())


@ONE_BACKEND
def test_a_shut_off_domain_is_read_in_place_its_disks_held_and_restores_bit_for_bit(
        vault, guest_factory, tmp_path) -> None:
    """A shut-off domain's disks are read through a read-only qemu-nbd export, not copied
    into scratch; while the backup reads them the domain cannot start (the export holds
    the images' locks); the point restores bit for bit."""
    import libvirt
    from virtwarden.catalog import jobs as job_rows

    from tests.faults import pause_env, stopped_at

    vw = vault
    g = guest_factory(disks=2, size_mib=32)
    g.write_random("vda", 0, 6 * MiB)
    g.write("vdb", 9 * MiB, MiB, pattern=0x5D)
    g.dom.destroy()  # QEMU writes everything out
    expected = {t: g.shadow_copy(t, tmp_path / f"{t}.raw") for t in ("vda", "vdb")}
    faults = tmp_path / "faults"
    worker = vw.start_worker(env=pause_env("storing", faults))  # after the first disk, its export open
    r = vw.cli("backup", g.name, "--target", "vault", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at("storing", faults)
    held = [p for p in vw.scratch.rglob("*") if p.is_file() or p.is_socket()]
    assert held and all(p.is_socket() for p in held), held  # the export's socket, no copy of a disk
    with pytest.raises(libvirt.libvirtError, match="lock"):
        g.dom.create()
    worker.resume()
    cat = vw.catalog()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the backup to finish")
    assert done.state == "succeeded", done.error
    assert (done.result["level"], done.result["consistency"]) == ("full", "offline"), done.result
    assert not g.dom.isActive()
    out = _restore(vw, g, done.result["point_id"], tmp_path / "out")
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", expected[t]), t
    assert not list(vw.scratch.glob("job-*"))


@ONE_BACKEND
def test_a_pull_mode_point_holds_the_disk_as_it_was_when_the_backup_began(vault, guest_factory, tmp_path) -> None:
    """Running domains are read over NBD in pull mode, not copied: the guest writes while
    the backup runs (its worker stopped right after backupBegin) and the point still holds
    the disk as it was when the backup began (QEMU keeps the overwritten blocks in the
    scratch image); the guest's writes are on its disk; the next incremental has them."""
    from virtwarden.catalog import jobs as job_rows
    from virtwarden.tasks.backup import PULL_BEGUN

    from tests.faults import pause_env, stopped_at

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    g.write_random("vda", 0, 8 * MiB)
    faults = tmp_path / "faults"
    worker = vw.start_worker(env=pause_env(PULL_BEGUN, faults))
    before = g.shadow_copy("vda", tmp_path / "before.raw")
    r = vw.cli("backup", g.name, "--target", "vault", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at(PULL_BEGUN, faults)
    assert (vw.scratch / next(p.name for p in vw.scratch.iterdir()) / "nbd.sock").is_socket()
    g.write("vda", 2 * MiB, 3 * MiB, pattern=0x6B)  # over data the backup has not read yet
    g.write("vda", 20 * MiB, MiB, pattern=0x6C)  # and where there was none
    worker.resume()
    cat = vw.catalog()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the backup to finish")
    assert done.state == "succeeded", done.error
    out = _restore(vw, g, done.result["point_id"], tmp_path / "first")
    assert images_equal(out / "vda.qcow2", before)
    after = g.shadow_copy("vda", tmp_path / "after.raw")
    second = _backup(vw, g)
    assert second["level"] == "incremental"
    assert images_equal(_restore(vw, g, second["point_id"], tmp_path / "second") / "vda.qcow2", after)


@ONE_BACKEND
def test_an_unprivileged_qemu_serves_pull_mode_from_its_own_socket_directory_else_push_mode(
        vault, guest_factory, tmp_path) -> None:
    """The guest's QEMU runs as libvirt-qemu (its own DAC label; qemu.conf's user is
    root here): it may not bind a socket in scratch (root's, 0700), so the worker makes
    it a directory of its own there. The first backup finds that directory taken from
    QEMU (root's again, as a MAC policy would refuse it): QEMU really fails to bind, and
    the backup runs in push mode, nothing left of the attempt. The next one is served
    in pull mode by the unprivileged QEMU. Both restore bit for bit."""
    import grp
    import pwd

    from virtwarden.catalog import jobs as job_rows
    from virtwarden.tasks.backup import PULL_SOCKET_MADE

    from tests.faults import pause_env, stopped_at

    vw = vault
    qemu = (pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("kvm").gr_gid)
    g = guest_factory(disks=1, size_mib=32, qemu_user=qemu)
    pid = int(Path(f"/run/libvirt/qemu/{g.name}.pid").read_text())
    assert os.stat(f"/proc/{pid}").st_uid == qemu[0], "the guest's QEMU is unprivileged"
    g.write_random("vda", 0, 8 * MiB)
    faults = tmp_path / "faults"
    worker = vw.start_worker(env=pause_env(PULL_SOCKET_MADE, faults))
    r = vw.cli("backup", g.name, "--target", "vault", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at(PULL_SOCKET_MADE, faults)
    (place,) = vw.scratch.glob("job-*/nbd")
    assert (place.stat().st_uid, place.stat().st_mode & 0o777) == (qemu[0], 0o700)
    os.chown(place, 0, 0)  # QEMU may not bind its socket there now
    expected = g.shadow_copy("vda", tmp_path / "first.raw")
    worker.resume()
    cat = vw.catalog()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the backup to finish")
    assert (done.state, done.attempts, done.result["level"]) == ("succeeded", 1, "full"), done.error
    said = worker.log.read_text()
    assert "QEMU could not serve the pull-mode backup" in said and "nbd-server-start" in said
    assert images_equal(_restore(vw, g, done.result["point_id"], tmp_path / "first") / "vda.qcow2", expected)

    g.write_random("vda", 12 * MiB, 2 * MiB)
    second = _backup(vw, g)
    assert second["level"] == "incremental"
    assert worker.log.read_text().count("pull-mode backup: reading the disks over NBD") == 1
    expected = g.shadow_copy("vda", tmp_path / "second.raw")
    assert images_equal(_restore(vw, g, second["point_id"], tmp_path / "second") / "vda.qcow2", expected)
    assert not list(vw.scratch.iterdir()), "nothing left in scratch"


@ONE_BACKEND
def test_a_worker_killed_during_a_pull_mode_backup_leaves_no_job_and_the_retry_backs_up(
        vault, guest_factory, tmp_path) -> None:
    """SIGKILL while a pull-mode backup runs: libvirt's backup job (its NBD export) and
    the new checkpoint outlive the worker. The retry's recovery aborts that job and
    deletes the checkpoint, then backs up; nothing of the dead attempt is left."""
    from virtwarden.catalog import jobs as job_rows
    from virtwarden.tasks.backup import PULL_BEGUN

    from tests.faults import kill_env

    vw = vault
    g = guest_factory(disks=2, size_mib=32)
    g.write_random("vda", 0, 4 * MiB)
    g.write_random("vdb", 8 * MiB, 2 * MiB)
    dying = vw.start_worker(env=kill_env(PULL_BEGUN, tmp_path / "faults"))
    r = vw.cli("backup", g.name, "--target", "vault", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    wait_for(lambda: (tmp_path / "faults" / f"{PULL_BEGUN}.pid").exists(), 60, "the worker to die in the backup")
    dying.kill()
    assert g.dom.jobInfo()[0] != 0, "the dead attempt's backup job should still run"
    vw.start_worker()
    cat = vw.catalog()
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the retry to finish")
    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert g.dom.jobInfo()[0] == 0  # no libvirt job left
    assert [c.getName() for c in g.dom.listAllCheckpoints()] == [done.result["checkpoint"]]
    expected = {t: g.shadow_copy(t, tmp_path / f"{t}.raw") for t in ("vda", "vdb")}
    out = _restore(vw, g, done.result["point_id"], tmp_path / "out")
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", expected[t]), t
    assert not list(vw.scratch.glob("job-*"))


def test_gc_killed_midway_leaves_every_point_restorable(vault, guest_factory, tmp_path) -> None:
    from tests.faults import kill_env

    vw = vault
    g = guest_factory(disks=1, size_mib=32)
    repo, kept = _unused_chunks(vw, g)
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")

    killed = vw.cli("storage", "gc", "vault", in_process=False,
                    env=kill_env("gc-deleting", tmp_path / "faults"))
    assert killed.code == -9
    out = _restore(vw, g, kept, tmp_path / "after-kill")
    assert images_equal(out / "vda.qcow2", expected)
    # Its marker stays, but names a process of this machine that is gone: it holds
    # neither a backup nor the next gc back, and that gc removes it.
    assert [i.key for i in repo.backend.list("gc/")]
    repo.end_writing(repo.begin_writing("a backup"))
    again = vw.cli("storage", "gc", "vault", "--json", in_process=False)
    assert again.code == 0 and again.json()["deleted"] > 0, again.err
    assert not list(repo.backend.list("gc/"))
    assert _backup(vw, g)["level"] == "incremental"
    out = _restore(vw, g, kept, tmp_path / "after-gc")
    assert images_equal(out / "vda.qcow2", expected)


def test_a_format1_target_switched_to_format2_keeps_its_points_and_starts_a_full(vw, guest_factory, tmp_path) -> None:
    """An operator turns an existing target (format-1 points in it) into format 2: the old
    points still restore, verify and prune; the next backup is a full in format 2 saying
    why, and the one after it an incremental of that."""
    g = guest_factory(disks=1, size_mib=16)
    g.write_random("vda", 0, 2 * MiB)
    worker = vw.start_worker()
    made, expected = [], []

    def point(level: str, fmt: int, why: str = "") -> None:
        r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
        assert r.code == 0, r.err + r.out
        result = r.json()["result"]
        assert (result["level"], result.get("format", 1)) == (level, fmt), result
        assert why in result["reason"], result
        made.append(result["point_id"])
        expected.append(g.shadow_copy("vda", tmp_path / f"expected-{len(made)}.raw"))
        g.write_random("vda", len(made) * MiB, 64 * 1024)

    point("full", 1)
    point("incremental", 1)
    old_files = sorted(p.relative_to(vw.storage_path("nfs")) for p in vw.storage_path("nfs").rglob("*")
                       if p.is_file())

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "pass").write_text("correct horse battery\n")
    vw.storage["nfs"].update({"format": 2, "key_file": str(secrets_dir / "nfs.key"),
                              "passphrase_file": str(secrets_dir / "pass")})
    r = vw.cli("key", "init", "nfs", *FAST_KDF)
    assert r.code == 0, r.err
    worker.kill()  # a worker reads its configuration when it starts: restarted, as an operator would
    vw.start_worker()
    point("full", 2, "first backup in repository format 2")
    point("incremental", 2)
    # the format-1 files are as they were (format 2 lives beside them, in its own names)
    assert all((vw.storage_path("nfs") / f).is_file() for f in old_files)

    for n, point_id in enumerate(made):
        r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(tmp_path / f"restored-{n}"), "--wait")
        assert r.code == 0, r.err + r.out
        assert images_equal(tmp_path / f"restored-{n}" / "vda.qcow2", expected[n]), n
    r = vw.cli("verify", g.name, "--wait", "--json")
    assert r.code == 0, r.err + r.out

    # retention deletes the format-1 chain whole; the format-2 point it keeps restores
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: p\n"
        "spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: nfs\n"
        "    retention:\n      keep_last: 1\n")
    vw.extra["policy_dir"] = str(pdir)
    r = vw.cli("prune", g.name, "--policy", "p", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["id"] for p in listed if p["status"] == "complete"] == [made[3]]
    assert not [f for f in old_files if (vw.storage_path("nfs") / f).exists()]
    r = vw.cli("restore", g.name, "--point", made[3], "--to-dir", str(tmp_path / "last"), "--wait")
    assert r.code == 0, r.err + r.out
    assert images_equal(tmp_path / "last" / "vda.qcow2", expected[3])
