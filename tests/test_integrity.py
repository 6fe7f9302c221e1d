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

from catalog import jobs as job_rows
from catalog.models import RestorePoint
from tests.guests import images_equal

pytestmark = pytest.mark.libvirt
MiB = 1024 * 1024
EXIT_FAILED, EXIT_NOT_FOUND, EXIT_STORAGE = 1, 4, 6


def _backup(vw, domain: str) -> dict:  # noqa: ANN001
    r = vw.cli("backup", domain, "--wait", "--json")
    assert r.code == 0, r.err
    return r.json()["result"]


def _points(vw, domain: str) -> list[dict]:  # noqa: ANN001
    r = vw.cli("backups", domain, "--json")
    assert r.code == 0, r.err
    return r.json()


def _stored(vw, domain: str, point: dict, name: str) -> Path:  # noqa: ANN001
    return vw.storage_path("nfs") / domain / point["chain_id"] / point["id"] / name


def _made(vw, guest, tmp_path: Path, steps: int) -> tuple[list[dict], list[dict[str, Path]]]:  # noqa: ANN001
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


def _restores_bit_for_bit(vw, domain: str, point_id: str, expected: dict[str, Path], out: Path) -> None:  # noqa: ANN001
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
