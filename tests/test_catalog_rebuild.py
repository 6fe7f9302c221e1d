"""``virtwarden catalog rebuild`` on real guests, real workers and real storage (a
directory and the S3 endpoint): the catalog file is deleted after a full and two
incrementals of one domain and a full and an incremental of another; the rebuild from
the manifests brings every point back as it was, each restores bit for bit, the next
backups continue their chains, a second rebuild changes nothing, and manifests that do
not parse or whose chain is broken are reported and never imported. The decisions
themselves (``tasks.rebuild.plan_rebuild``) are checked as a pure function first."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from virtwarden.catalog import points
from virtwarden.tasks.rebuild import Found, plan_rebuild, point_of

from tests.guests import images_equal
from tests.harness import s3_storage_entry

pytestmark = pytest.mark.cli_in_process  # the CLI in the test process; daemons still run apart

MiB = 1024 * 1024
KEPT = ("id", "created_at", "level", "chain_id", "parent_id", "size_bytes", "status", "storage", "strategy",
        "consistency", "manifest_sha256", "disks")


def _manifest(point: str, seq: int, parent: str | None, chain: str = "c1", domain: str = "web01") -> Found:
    key = f"{domain}/{chain}/{point}/manifest.json"
    return Found(key, f"{seq:064x}", {
        "format": "virtwarden-manifest/1", "point_id": point, "chain_id": chain, "parent_id": parent, "seq": seq,
        "level": "incremental" if seq else "full", "strategy": "bitmap", "reason": "r", "consistency": "crash",
        "host": "kvm01", "created_at": f"2025-03-30T12:0{seq}:00+00:00", "completed_at": None,
        "domain": {"name": domain, "uuid": "u-1", "xml": "<domain/>"},
        "checkpoint": {"name": f"virtwarden-{point}", "xml": "<domaincheckpoint/>"},
        "disks": [{"target": "vda", "mode": "full", "key": f"{domain}/{chain}/{point}/vda.qcow2", "size_bytes": 10,
                   "sha256": "ab" * 32, "virtual_size": 16 * MiB}]})


def _objects(*found: Found) -> dict[str, int]:
    return {f.key.replace("manifest.json", "vda.qcow2"): 10 for f in found} | {f.key: 1 for f in found}


def test_a_manifest_becomes_the_complete_point_it_describes():
    p = point_of("nfs", _manifest("p1", 1, "p0"))
    assert (p.id, p.domain, p.domain_uuid, p.host, p.storage, p.chain_id, p.parent_id, p.seq, p.level, p.status,
            p.checkpoint, p.size_bytes, p.manifest_key, p.manifest_sha256, p.created_at.isoformat()) == (
        "p1", "web01", "u-1", "kvm01", "nfs", "c1", "p0", 1, "incremental", "complete", "virtwarden-p1", 10,
        "web01/c1/p1/manifest.json", f"{1:064x}", "2025-03-30T12:01:00+00:00")
    assert [(a.target, a.key, a.sha256) for a in p.artifacts] == [("vda", "web01/c1/p1/vda.qcow2", "ab" * 32)]


def test_rebuild_imports_whole_chains_parents_first_and_refuses_what_does_not_hold():
    full, inc, inc2 = _manifest("p0", 0, None), _manifest("p1", 1, "p0"), _manifest("p2", 2, "p1")
    moved = replace(_manifest("p9", 0, None), key="web01/c1/other/manifest.json")
    no_data = _manifest("q0", 0, None, chain="c2")
    on_it = _manifest("q1", 1, "q0", chain="c2")
    skipped = _manifest("r2", 2, "p0")  # sequence 2 on a sequence-0 parent
    broken = Found("web01/c3/x/manifest.json", error="not valid JSON")
    found = [inc2, inc, full, moved, no_data, on_it, skipped, broken]
    objects = _objects(*found)
    del objects["web01/c2/q0/vda.qcow2"]
    plan = plan_rebuild("nfs", found, objects, [])
    assert [p.id for p in plan.imports] == ["p0", "p1", "p2"]
    assert {r.point: r.problem for r in plan.refused} == {
        "other": "it describes domain web01, chain c1, point p9 but is stored as web01/c1/other",
        "q0": "artifact web01/c2/q0/vda.qcow2 of disk vda is missing",
        "q1": "chain broken: its parent q0 has no manifest on this storage and is not in the catalog",
        "r2": "chain broken: it is sequence 2, its parent p0 is 0",
        "x": "does not parse: not valid JSON"}

    # Points the catalog has are left as they are; an incremental on a complete one is
    # imported, on a damaged one it is not.
    known = [point_of("nfs", full), replace(point_of("nfs", inc), status=points.DAMAGED),
             point_of("nfs", _manifest("gone", 0, None, chain="c9"))]
    sibling = _manifest("s1", 1, "p0")
    plan = plan_rebuild("nfs", [full, inc, inc2, sibling], _objects(full, inc, inc2, sibling), known)
    assert [p.id for p in plan.present] == ["p0", "p1"] and [p.id for p in plan.imports] == ["s1"]
    assert [(r.point, r.problem) for r in plan.refused] == [("p2", "chain broken: its parent p1 is damaged in the"
                                                                   " catalog")]
    assert [p.id for p in plan.catalog_only] == ["gone"]  # complete in the catalog, no manifest stored


def _backup(vw, domain: str, target: str) -> dict:
    r = vw.cli("backup", domain, "--target", target, "--wait", "--json")
    assert r.code == 0, r.err
    return r.json()["result"]


def _points(vw, domain: str) -> list[dict]:
    r = vw.cli("backups", domain, "--json")
    assert r.code == 0, r.err
    return r.json()


def _history(vw, guest, target: str, steps: int, tmp_path: Path) -> list[dict[str, Path]]:
    """``steps`` backups of ``guest`` after writes of their own; what each point must hold."""
    expected = []
    for step in range(steps):
        for i, t in enumerate(list(guest.disks)):
            guest.write(t, (step * 3 + i) * MiB, MiB, pattern=0x30 + 16 * i + step)
        guest.write_random(list(guest.disks)[0], 10 * MiB + step * 512 * 1024, 128 * 1024)
        result = _backup(vw, guest.name, target)
        assert result["level"] == ("full" if step == 0 else "incremental"), result
        expected.append({t: guest.shadow_copy(t, tmp_path / f"{guest.name}-{step}-{t}.raw") for t in list(guest.disks)})
    return expected


def _rebuild(vw, *args: str):
    return vw.cli("catalog", "rebuild", *args, "--json")


def _restores(vw, guest, point_id: str, expected: dict[str, Path], out: Path) -> None:
    r = vw.cli("restore", guest.name, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    for t, copy in expected.items():
        assert images_equal(out / f"{t}.qcow2", copy), f"{guest.name} {point_id} {t} differs"


@pytest.mark.libvirt
def test_a_deleted_catalog_is_rebuilt_from_the_manifests_and_every_point_restores(
        vw, guest_factory, tmp_path, request):
    vw.storage["s3"] = s3_storage_entry(request.getfixturevalue("s3_settings"))
    a = guest_factory(disks=2, size_mib=16)
    b = guest_factory(disks=1, size_mib=16)
    worker = vw.start_worker()
    expected = {a.name: _history(vw, a, "nfs", 3, tmp_path), b.name: _history(vw, b, "s3", 2, tmp_path)}
    before = {g.name: _points(vw, g.name) for g in (a, b)}
    assert all(p["manifest_sha256"] for ps in before.values() for p in ps)

    # What the repository also holds: a manifest that is not JSON, and an incremental
    # whose parent is not stored anywhere (as a hand-copied point would be).
    repo = vw.storage_path("nfs")
    chain = before[a.name][0]["chain_id"]
    garbage = repo / a.name / chain / "0badf00d-0000-4000-8000-000000000001" / "manifest.json"
    garbage.parent.mkdir()
    garbage.write_text("{not json")
    head = before[a.name][-1]
    orphan_id = "0badf00d-0000-4000-8000-000000000002"
    orphan = json.loads((repo / a.name / chain / head["id"] / "manifest.json").read_text())
    orphan.update(point_id=orphan_id, parent_id="0badf00d-0000-4000-8000-000000000003", seq=3)
    for disk in orphan["disks"]:
        disk["key"] = disk["key"].replace(head["id"], orphan_id)
        (repo / disk["key"]).parent.mkdir(exist_ok=True)
        (repo / disk["key"]).write_bytes((repo / disk["key"].replace(orphan_id, head["id"])).read_bytes())
    (repo / a.name / chain / orphan_id / "manifest.json").write_text(json.dumps(orphan, indent=2, sort_keys=True))

    worker.stop()
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (vw.data_dir / name).unlink(missing_ok=True)

    dry = _rebuild(vw, "--storage", "nfs", "--dry-run")
    assert dry.code == 0, dry.err
    assert [p["id"] for p in dry.json()["imported"]] == [p["id"] for p in before[a.name]]
    assert _points(vw, a.name) == []  # a dry run changes nothing

    done = _rebuild(vw, "--storage", "nfs")
    assert done.code == 1, done.err  # two manifests refused
    report = done.json()
    assert [p["id"] for p in report["imported"]] == [p["id"] for p in before[a.name]]
    refused = {r["point"]: r["problem"] for r in report["refused"]}
    assert refused.keys() == {garbage.parent.name, orphan_id}
    assert refused[garbage.parent.name].startswith("does not parse:")
    assert refused[orphan_id].startswith("chain broken: its parent 0badf00d-0000-4000-8000-000000000003")
    s3 = _rebuild(vw, "--storage", "s3")
    assert s3.code == 0, s3.err
    assert [p["id"] for p in s3.json()["imported"]] == [p["id"] for p in before[b.name]]

    for g in (a, b):
        after = _points(vw, g.name)
        assert [{k: p[k] for k in KEPT} for p in after] == [{k: p[k] for k in KEPT} for p in before[g.name]]
    again = _rebuild(vw, "--storage", "s3")  # idempotent: nothing new, each point reported
    assert again.code == 0 and again.json()["imported"] == []
    assert {p["id"] for p in again.json()["present"]} == {p["id"] for p in before[b.name]}

    vw.start_worker()
    for g in (a, b):
        for point, want in zip(before[g.name], expected[g.name], strict=False):
            _restores(vw, g, point["id"], want, tmp_path / f"restored-{point['id']}")

    # The next backups continue the chains: the newest point's checkpoint (a's bitmap
    # strategy) is still the domain's in libvirt, and its manifest names it.
    for g, target in ((a, "nfs"), (b, "s3")):
        for t in list(g.disks):
            g.write(t, 14 * MiB, MiB, pattern=0x99)
        nxt = _backup(vw, g.name, target)
        assert (nxt["level"], nxt["chain_id"]) == ("incremental", before[g.name][0]["chain_id"]), nxt
        now = {t: g.shadow_copy(t, tmp_path / f"{g.name}-next-{t}.raw") for t in list(g.disks)}
        _restores(vw, g, nxt["point_id"], now, tmp_path / f"next-{g.name}")
    verified = vw.cli("verify", "--wait", "--json")
    assert verified.code == 0, verified.out + verified.err
    assert verified.json()["result"]["points"] == 7
