"""The catalog's side of integrity, on real guests through real workers: a manifest
changed after its backup is refused by every reader that acts on it (restore, its dry
run, a drill), checked against the SHA-256 the catalog recorded; points made before
manifests were checksummed are still accepted, and said to be; a verification re-reads
a sample of the points, least recently verified first; a point found damaged is
unlisted with every point built on it, and the next backup starts a new chain saying
why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update
from virtwarden.catalog import jobs as job_rows
from virtwarden.catalog.models import RestorePoint

from tests.guests import images_equal

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024
EXIT_FAILED, EXIT_NOT_FOUND, EXIT_STORAGE = 1, 4, 6


def _backup(vw, domain: str) -> dict:
    r = vw.cli("backup", domain, "--wait", "--json")
    assert r.code == 0, r.err
    return r.json()["result"]


def _points(vw, domain: str) -> list[dict]:
    r = vw.cli("backups", domain, "--json")
    assert r.code == 0, r.err
    return r.json()


def _stored(vw, domain: str, point: dict, name: str) -> Path:
    return vw.storage_path("nfs") / domain / point["chain_id"] / point["id"] / name


def _made(vw, guest, tmp_path: Path, steps: int) -> tuple[list[dict], list[dict[str, Path]]]:
    """A full and ``steps - 1`` incrementals of ``guest``, each after its own writes, with
    a copy of what the disk held at each point."""
    results, expected = [], []
    for step in range(steps):
        guest.write("vda", step * 2 * MiB, MiB, pattern=0x40 + step)
        guest.write_random("vda", 8 * MiB + step * MiB, 256 * 1024)
        results.append(_backup(vw, guest.name))
        expected.append({"vda": guest.shadow_copy("vda", tmp_path / f"expected-{step}.raw")})
    assert [r["level"] for r in results] == ["full"] + ["incremental"] * (steps - 1)
    return results, expected


def _restores_bit_for_bit(vw, domain: str, point_id: str, expected: dict[str, Path], out: Path) -> None:
    r = vw.cli("restore", domain, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    for target, copy in expected.items():
        assert images_equal(out / f"{target}.qcow2", copy), f"{point_id} {target} differs"


def _flip_bytes(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = f.read(64)
        f.seek(-len(data), 1)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_manifest_changed_after_its_backup_is_refused_before_anything_is_written(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    results, expected = _made(vw, g, tmp_path, 2)
    full, inc = _points(vw, g.name)
    manifest = _stored(vw, g.name, full, "manifest.json")
    original = manifest.read_bytes()
    data = json.loads(original)
    data["disks"][0]["target"] = "vdz"  # still valid JSON, same keys and artifact checksums
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    key = f"{g.name}/{full['chain_id']}/{full['id']}/manifest.json"

    out = tmp_path / "restored"
    for extra in (["--dry-run"], ["--wait"]):
        r = vw.cli("restore", g.name, "--point", inc["id"], "--to-dir", str(out), *extra)
        assert r.code == EXIT_STORAGE, r.out + r.err
        assert f"restore point {full['id']}: manifest {key} is not the one the catalog recorded" in r.err
    assert not out.exists()
    assert job_rows.recent(vw.catalog(), domain=g.name, limit=1)[0].kind == "backup"  # no restore job was made

    # A drill resolves its point only; the worker reads the manifests and refuses too.
    drill = vw.cli("drill", g.name, "--wait")
    assert drill.code == EXIT_FAILED and "checksums" in drill.out and "not the one the catalog recorded" in drill.out

    # The same bytes as at backup time are trusted again.
    manifest.write_bytes(original)
    _restores_bit_for_bit(vw, g.name, inc["id"], expected[1], tmp_path / "after")

    # A point made before manifests were checksummed has no record: it is compared with
    # the catalog only, and restores.
    with vw.catalog().session() as s:
        s.execute(update(RestorePoint).where(RestorePoint.id == inc["id"]).values(manifest_sha256=None))
    _restores_bit_for_bit(vw, g.name, inc["id"], expected[1], tmp_path / "legacy")
    # ... but its artifact list still has to match the catalog's.
    inc_manifest = _stored(vw, g.name, inc, "manifest.json")
    data = json.loads(inc_manifest.read_text())
    data["disks"][0]["sha256"] = "0" * 64
    inc_manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    r = vw.cli("restore", g.name, "--point", inc["id"], "--to-dir", str(tmp_path / "refused"), "--dry-run")
    assert r.code == EXIT_STORAGE and f"restore point {inc['id']}: manifest" in r.err and "does not match" in r.err
    assert results[1]["point_id"] == inc["id"]


def _verify(vw, *args: str):
    return vw.cli("verify", *args, "--wait", "--json")


def _verified_at(vw, domain: str) -> dict:
    return {p["id"]: p["verified_at"] for p in _points(vw, domain)}


def test_verify_rereads_a_sample_least_recently_verified_first(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    _made(vw, g, tmp_path, 4)
    ids = [p["id"] for p in _points(vw, g.name)]
    with vw.catalog().session() as s:  # as if made before manifests were checksummed
        s.execute(update(RestorePoint).where(RestorePoint.id == ids[3]).values(manifest_sha256=None))

    dry = vw.cli("verify", g.name, "--sample", "50", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert {k: dry.json()[k] for k in ("points", "artifacts", "artifacts_to_read_at_least", "never_verified",
                                       "manifests_without_checksum")} == {
        "points": 4, "artifacts": 4, "artifacts_to_read_at_least": 2, "never_verified": 4,
        "manifests_without_checksum": 1}

    first = _verify(vw, g.name, "--sample", "50")
    assert first.code == 0, first.err
    report = first.json()["result"]
    assert (report["points"], report["reread"], report["artifacts"]) == (4, 2, 2)
    assert report["problems"] == [] and report["manifests_without_checksum"] == [ids[3]]
    assert "1 point(s) made before manifests were checksummed" in report["summary"]
    once = set(report["verified"])
    assert {i for i, at in _verified_at(vw, g.name).items() if at} == once

    second = _verify(vw, g.name, "--sample", "50").json()["result"]
    assert set(second["verified"]) == set(ids) - once  # never verified ones first

    at = _verified_at(vw, g.name)
    third = _verify(vw, g.name, "--sample", "25").json()["result"]
    assert third["verified"] == [min(at, key=lambda i: at[i])]  # then the least recently verified

    whole = _verify(vw, g.name).json()["result"]
    assert sorted(whole["verified"]) == sorted(ids) and whole["bytes_read"] > 0
    text = vw.cli("backups", g.name)
    assert "VERIFIED (UTC)" in text.out and " - " not in text.out.split("\n", 1)[1]


def test_a_restore_that_meets_a_damaged_artifact_takes_its_point_and_the_chain_on_it_out_of_service(
        vw, guest_factory, tmp_path):
    """Bit rot in an incremental's artifact, met by a restore before any verification:
    the restore refuses, and (after a second read agrees) marks that point damaged with
    the points built on it, as verify would. Before, the chain stayed complete and the
    next backups went on extending a chain that could no longer be restored."""
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    results, expected = _made(vw, g, tmp_path, 3)
    full, first, second = _points(vw, g.name)
    _flip_bytes(_stored(vw, g.name, first, "vda.qcow2"))

    refused = vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(tmp_path / "no"), "--wait")
    assert refused.code == EXIT_STORAGE, refused.err  # ChecksumMismatch: not retried
    assert f"{g.name}/" in refused.err and "vda.qcow2" in refused.err, refused.err
    assert not (tmp_path / "no" / "vda.qcow2").exists()
    listed = {p["id"]: p for p in _points(vw, g.name)}
    assert [listed[p["id"]]["status"] for p in (full, first, second)] == ["complete", "damaged", "damaged"]
    assert "found by restore job" in listed[first["id"]]["damage"]

    _restores_bit_for_bit(vw, g.name, "latest", expected[0], tmp_path / "latest")
    g.write("vda", 12 * MiB, MiB, pattern=0x77)
    after = _backup(vw, g.name)
    assert after["level"] == "full" and after["chain_id"] != full["chain_id"]
    _restores_bit_for_bit(vw, g.name, after["point_id"], {"vda": g.shadow_copy("vda", tmp_path / "now.raw")},
                          tmp_path / "after")


def test_a_damaged_point_is_unlisted_with_every_point_built_on_it_and_the_next_backup_starts_a_new_chain(
        vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    results, expected = _made(vw, g, tmp_path, 3)
    full, first, second = _points(vw, g.name)
    artifact = _stored(vw, g.name, first, "vda.qcow2")
    _flip_bytes(artifact)

    found = _verify(vw, g.name)
    assert found.code == EXIT_FAILED, found.out + found.err
    job = found.json()
    assert job["state"] == "failed" and f"point {first['id']} {g.name}/" in job["error"]
    report = job["result"]
    assert [(p["point"], p["damaged"], p["damaged_with_it"]) for p in report["problems"]] == [
        (first["id"], True, [second["id"]])]
    assert report["damaged"] == sorted([first["id"], second["id"]]) and report["verified"] == [full["id"]]

    listed = {p["id"]: p for p in _points(vw, g.name)}
    assert [listed[p["id"]]["status"] for p in (full, first, second)] == ["complete", "damaged", "damaged"]
    assert "vda.qcow2" in listed[first["id"]]["damage"] and "sha" in listed[first["id"]]["damage"].lower()
    assert listed[second["id"]]["damage"].startswith(f"built on damaged restore point {first['id']}")
    text = vw.cli("backups", g.name).out
    assert f"{first['id']} damaged: {g.name}/" in text and f"{second['id']} damaged: built on" in text

    # Never restored: latest is the last intact point; a damaged one is refused by name.
    _restores_bit_for_bit(vw, g.name, "latest", expected[0], tmp_path / "latest")
    refused = vw.cli("restore", g.name, "--point", second["id"], "--to-dir", str(tmp_path / "no"), "--dry-run")
    assert refused.code == EXIT_NOT_FOUND and "damaged" in refused.err

    # Never built on: the next backup is a full of a new chain, and says why.
    g.write("vda", 12 * MiB, MiB, pattern=0x77)
    after = _backup(vw, g.name)
    assert after["level"] == "full" and after["chain_id"] != full["chain_id"]
    assert f"restore point {second['id']} of the last chain is damaged" in after["reason"]
    _restores_bit_for_bit(vw, g.name, after["point_id"], {"vda": g.shadow_copy("vda", tmp_path / "now.raw")},
                          tmp_path / "after")
    g.write("vda", 13 * MiB, MiB, pattern=0x78)
    assert _backup(vw, g.name)["level"] == "incremental"  # the new chain goes on

    again = _verify(vw, g.name)  # what is out of service is not checked again: nothing pages twice
    assert again.code == 0, again.out + again.err
    assert again.json()["result"]["points"] == 3 and results[1]["point_id"] == first["id"]
