"""The ``blockcommit`` strategy on real guests: external disk-only snapshots, the frozen
layer shipped, block commits, a real worker. Every point restores bit for bit, the live
chain is never more than two deep after a run, guest writes keep landing, and a run
that fails or dies half-way leaves the domain on a chain we know."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC
from pathlib import Path

import pytest

from tests.guests import images_equal
from tests.harness import s3_storage_entry

pytestmark = pytest.mark.cli_in_process  # the CLI in the test process; daemons still run apart

KiB, MiB = 1024, 1024 * 1024
CLUSTER = 64 * KiB


def _policy(vw, tmp_path: Path, target: str, full_every: int = 7) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "bc.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: bc\n"
        f"spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: {target}\n"
        f"    strategy: blockcommit\n    full_every: {full_every}\n")
    vw.extra["policy_dir"] = str(pdir)


def _backup(vw, domain: str, *extra: str) -> dict:
    r = vw.cli("backup", domain, "--policy", "bc", "--wait", "--json", *extra)
    assert r.code == 0, r.err + r.out
    job = r.json()
    assert job["state"] == "succeeded", job
    return job["result"]


def _chain(g, target: str) -> list[str]:
    """The live chain of ``target`` from the running domain's XML, active image first."""
    for disk in ET.fromstring(g.xml()).iterfind("devices/disk"):
        if disk.find("target").get("dev") != target:
            continue
        chain, node = [], disk
        while node is not None and node.find("source") is not None:
            chain.append(node.find("source").get("file"))
            node = node.find("backingStore")
        return chain
    raise KeyError(target)


def _restore(vw, g, point_id: str, out: Path) -> None:
    r = vw.cli("restore", g.name, "--point", point_id, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err


def _allocated_data(path: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data") and e.get("depth", 0) == 0)


def _writes(g, step: int) -> list[tuple[str, int, int]]:
    """Guest writes before point ``step``; returns the extents of an incremental."""
    if step == 0:
        g.write_random("vda", 0, 4 * MiB)
        g.write("vdb", 8 * MiB, 2 * MiB, pattern=0x5A)
        return []
    if step == 1:
        g.write("vda", 64 * KiB + 512, 4096, pattern=0x11)  # a partial cluster
        g.write_random("vda", 20 * MiB, 3 * MiB)
        g.zero("vdb", 8 * MiB, 64 * KiB)  # zeroes over older data must restore as zeroes
        return [("vda", 64 * KiB + 512, 4096), ("vda", 20 * MiB, 3 * MiB), ("vdb", 8 * MiB, 64 * KiB)]
    g.write_random("vda", 1 * MiB, 2 * MiB)
    g.write("vdb", 31 * MiB, 1 * MiB, pattern=0xC3)  # the disk's last MiB
    return [("vda", 1 * MiB, 2 * MiB), ("vdb", 31 * MiB, 1 * MiB)]


@pytest.mark.libvirt
@pytest.mark.parametrize("target", ["nfs", "s3"])
def test_full_then_two_incrementals_restore_bit_for_bit(vw, guest_factory, tmp_path, target, request):
    if target == "s3":
        vw.storage["s3"] = s3_storage_entry(request.getfixturevalue("s3_settings"))
    _policy(vw, tmp_path, target)
    # On S3 the second disk is raw: blockcommit tracks it like a qcow2 one.
    g = guest_factory(disks=2, size_mib=32, raw=("vdb",) if target == "s3" else ())
    bases = {t: str(g.disk_path(t)) for t in ("vda", "vdb")}
    vw.start_worker()
    expected, results, dirtied = [], [], []
    for step in range(3):
        dirtied.append(_writes(g, step))
        results.append(_backup(vw, g.name))
        copy = tmp_path / f"expected-{step}"
        copy.mkdir()
        expected.append({t: g.shadow_copy(t, copy / f"{t}.raw") for t in ("vda", "vdb")})
        for t in ("vda", "vdb"):
            chain = _chain(g, t)
            assert len(chain) <= 2, (step, t, chain)
            assert chain == [results[-1]["overlays"][t], bases[t]], (step, t, chain)
        # Merged trackers are deleted: only the base and the live tracker remain.
        assert sorted(p.name for p in g.workdir.glob("vd*.virtwarden-*.qcow2")) == \
            sorted(Path(p).name for p in results[-1]["overlays"].values())

    assert [r["level"] for r in results] == ["full", "incremental", "incremental"]
    assert all(r["consistency"] == "crash" and "warnings" not in r for r in results)
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["id"] for p in listed] == [r["point_id"] for r in results]
    assert {p["chain_id"] for p in listed} == {results[0]["chain_id"]}
    assert all(p["status"] == "complete" and p["strategy"] == "blockcommit" for p in listed)

    for step, point in enumerate(listed):
        out = tmp_path / f"restored-{step}"
        _restore(vw, g, point["id"], out)
        for t in ("vda", "vdb"):
            assert images_equal(out / f"{t}.qcow2", expected[step][t]), f"point {step} disk {t} differs"

    if target == "nfs":  # an incremental holds what was written, rounded to clusters, not the disk
        repo = Path(vw.storage["nfs"]["path"])
        for step in (1, 2):
            manifest = json.loads(next(repo.rglob(f"{results[step]['point_id']}/manifest.json")).read_text())
            assert {d["target"]: d["mode"] for d in manifest["disks"]} == {"vda": "incremental", "vdb": "incremental"}
            for t in ("vda", "vdb"):
                art = next(repo.rglob(f"{results[step]['point_id']}/{t}.qcow2"))
                bound = sum(((o + n + CLUSTER - 1) // CLUSTER - o // CLUSTER) * CLUSTER
                            for d, o, n in dirtied[step] if d == t)
                assert _allocated_data(art) <= bound, (step, t)
                assert "backing-filename" not in json.loads(subprocess.run(
                    ["qemu-img", "info", "--output=json", str(art)], capture_output=True, text=True).stdout)

        # A full over a live tracker: the frozen chain flattened, the old tracker merged.
        g.write("vda", 2 * MiB, MiB, pattern=0x77)
        full = _backup(vw, g.name, "--full")
        assert full["level"] == "full" and full["chain_id"] != results[0]["chain_id"]
        assert all(_chain(g, t) == [full["overlays"][t], bases[t]] for t in ("vda", "vdb"))
        assert len(list(g.workdir.glob("vd*.virtwarden-*.qcow2"))) == 2
        results.append(full)
        _restore(vw, g, full["point_id"], tmp_path / "restored-full")
        for t in ("vda", "vdb"):
            assert images_equal(tmp_path / "restored-full" / f"{t}.qcow2", g.shadow_copy(t, tmp_path / f"f-{t}.raw"))

    # Guest writes still land on the live chain after the backups.
    g.write("vda", 5 * MiB, MiB, pattern=0x9E)
    g.write_random("vdb", 12 * MiB, MiB)
    g.dom.destroy()
    for t in ("vda", "vdb"):
        assert images_equal(results[-1]["overlays"][t], g.shadow_copy(t, tmp_path / f"final-{t}.raw"),
                            fmt_a="qcow2"), t
    assert not any(vw.scratch.rglob("*.qcow2"))


@pytest.mark.libvirt
def test_a_chain_changed_outside_starts_a_new_full_and_says_why(vw, guest_factory, tmp_path):
    """Someone merges our tracker with virsh: the next run cannot be an incremental."""
    _policy(vw, tmp_path, "nfs")
    g = guest_factory(disks=1, size_mib=32)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x31)
    first = _backup(vw, g.name)
    subprocess.run(["virsh", "-c", "qemu:///system", "blockcommit", g.name, "vda", "--active", "--pivot",
                    "--wait", "--timeout", "120"], check=True, capture_output=True)
    assert _chain(g, "vda") == [str(g.disk_path("vda"))]
    g.write("vda", 2 * MiB, MiB, pattern=0x32)
    second = _backup(vw, g.name)
    assert second["level"] == "full" and second["chain_id"] != first["chain_id"]
    assert "active image of vda" in second["reason"], second["reason"]
    assert len(_chain(g, "vda")) == 2
    out = tmp_path / "r"
    _restore(vw, g, second["point_id"], out)
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))
    # The old tracker left the chain without us: closed in the journal, its file kept.
    from virtwarden.catalog import overlays

    rows = {r.overlay_path: r.state for r in overlays.for_domain(vw.catalog(), g.name)}
    assert rows[first["overlays"]["vda"]] == "abandoned"
    assert rows[second["overlays"]["vda"]] == "tracking"


def _in_process(vw, backend_class=None):
    """A JobContext like a worker's, for driving a job (or its pieces) from the test."""
    from virtwarden.hypervisor.libvirt_host import LibvirtHost
    from virtwarden.storage_backends import open_backend
    from virtwarden.tasks.context import JobContext

    from virtwarden.config import load

    cfg = load(str(vw.config_path))

    def storage(name: str):
        settings = cfg.storage_target(name)
        return backend_class(name, settings) if backend_class else open_backend(name, settings)

    hv = LibvirtHost("local", "qemu:///system").open()
    return JobContext(job_id="test-in-process", catalog=vw.catalog(), hypervisor=hv, storage=storage,
                      scratch_root=vw.scratch, poll_seconds=0.1)


@pytest.mark.libvirt
def test_an_overlay_left_by_a_dead_run_is_merged_back(vw, guest_factory, tmp_path):
    """A worker killed right after its snapshot leaves a journaled overlay as the active
    image. The next run merges it back (the writes it holds are kept) and goes on with
    an incremental; nothing of ours is left behind."""
    from virtwarden.catalog import overlays
    from virtwarden.tasks.overlays import block_jobs

    _policy(vw, tmp_path, "nfs")
    g = guest_factory(disks=2, size_mib=32)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x41)
    first = _backup(vw, g.name)

    # What the dead run left: journal rows, then the snapshot, then guest writes on top.
    ctx = _in_process(vw)
    bj = block_jobs(ctx)
    token = "virtwarden-19990101T000000-deadbeef"
    dead = {t: str(g.workdir / f"{t}.{token}.qcow2") for t in ("vda", "vdb")}
    for t, path in dead.items():
        overlays.record(ctx.catalog, job_id="dead-job", domain=g.name, target=t, overlay_path=path,
                        base_path=first["overlays"][t])
    bj.snapshot(g.name, token, dead)
    assert len(_chain(g, "vda")) == 3
    g.write("vda", 3 * MiB, MiB, pattern=0x42)
    g.write("vdb", 4 * MiB, MiB, pattern=0x43)
    ctx.hypervisor.close()

    second = _backup(vw, g.name)
    assert second["level"] == "incremental", second["reason"]
    for t in ("vda", "vdb"):
        assert _chain(g, t) == [second["overlays"][t], str(g.disk_path(t))]
        assert not Path(dead[t]).exists()
    states = {r.overlay_path: r.state for r in overlays.for_domain(vw.catalog(), g.name)}
    assert {states[p] for p in dead.values()} == {"committed"}
    out = tmp_path / "r"
    _restore(vw, g, second["point_id"], out)
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", g.shadow_copy(t, tmp_path / f"now-{t}.raw")), t


def test_a_merged_overlay_whose_file_stayed_behind_is_deleted_by_the_next_run(vw, guest_factory, tmp_path):
    """A worker that died between merging an overlay and deleting its file (a release
    closed the journal row first) left the file next to the disk; the next run deletes
    it. A file that merely looks like ours, with no journal row, stays."""
    from virtwarden.catalog import overlays

    _policy(vw, tmp_path, "nfs")
    g = guest_factory(disks=1, size_mib=32)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x51)
    first = _backup(vw, g.name)
    g.write("vda", MiB, MiB, pattern=0x52)
    _backup(vw, g.name)
    merged = first["overlays"]["vda"]
    states = {r.overlay_path: r.state for r in overlays.for_domain(vw.catalog(), g.name)}
    assert states[merged] == "committed" and not Path(merged).exists()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", merged, "32M"], check=True)  # left behind
    foreign = g.workdir / "vda.virtwarden-19990101T000000-0badc0de.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(foreign), "32M"], check=True)

    third = _backup(vw, g.name)
    assert third["level"] == "incremental", third["reason"]
    assert not Path(merged).exists()
    assert foreign.exists()  # no journal row: not ours to delete


@pytest.mark.libvirt
def test_a_failure_after_the_snapshot_returns_the_chain_to_where_it_was(vw, guest_factory, tmp_path):
    """The target fails while an incremental is being stored: the point fails, the new
    overlay is merged back into the tracker, and the next run is an incremental that
    holds the writes of both runs."""
    from virtwarden.storage_backends.nfs import NfsBackend
    from virtwarden.tasks.backup import BackupRequest, run_backup

    from virtwarden.errors import StorageError

    class Failing(NfsBackend):
        def publish_staged(self, key, staged, *, progress=None):
            raise StorageError(f"storage {self.name}: injected failure storing {key}")

    _policy(vw, tmp_path, "nfs")
    g = guest_factory(disks=2, size_mib=32)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x51)
    first = _backup(vw, g.name)
    before = {t: _chain(g, t) for t in ("vda", "vdb")}
    g.write("vda", 6 * MiB, MiB, pattern=0x52)

    ctx = _in_process(vw, Failing)
    with pytest.raises(StorageError, match="injected"):
        run_backup(ctx, BackupRequest(domain=g.name, storage="nfs", strategy="blockcommit"))
    ctx.hypervisor.close()
    assert {t: _chain(g, t) for t in ("vda", "vdb")} == before
    assert sorted(p.name for p in g.workdir.glob("*.virtwarden-*.qcow2")) == \
        sorted(Path(p).name for p in first["overlays"].values())
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["complete", "failed"]

    g.write("vdb", 7 * MiB, MiB, pattern=0x53)
    second = _backup(vw, g.name)
    assert second["level"] == "incremental" and second["chain_id"] == first["chain_id"]
    out = tmp_path / "r"
    _restore(vw, g, second["point_id"], out)
    for t in ("vda", "vdb"):
        assert images_equal(out / f"{t}.qcow2", g.shadow_copy(t, tmp_path / f"now-{t}.raw")), t


@pytest.mark.libvirt
def test_an_active_commit_that_cannot_finish_in_time_is_aborted(guest_factory, tmp_path):
    """Bounded: a merge that does not become ready in time is aborted and reported, and
    the chain stays as it was (the overlay still active, nothing lost)."""
    from virtwarden.hypervisor.blockjobs import BlockJobs, paths
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    from virtwarden.errors import HypervisorError

    g = guest_factory(disks=1, size_mib=64)
    overlay = str(g.workdir / "vda.virtwarden-19990101T000000-0000abcd.qcow2")
    with LibvirtHost("local", "qemu:///system") as hv:
        bj = BlockJobs(hv)
        bj.snapshot(g.name, "virtwarden-test", {"vda": overlay})
        # More than QEMU's mirror copies in its first burst (its buffer is 16 MiB): the
        # rest, at 256 KiB/s, cannot be done in half a second however fast the machine.
        g.write_random("vda", 0, 40 * MiB)
        with pytest.raises(HypervisorError, match="never became ready to pivot"):
            bj.commit_active(g.name, "vda", timeout=0.5, poll=0.1, bandwidth=256 * KiB)
        assert bj.job(g.name, "vda") is None
        assert paths(bj.chains(g.name)["vda"]) == (overlay, str(g.disk_path("vda")))
        g.write("vda", 9 * MiB, MiB, pattern=0x61)
        bj.commit_active(g.name, "vda", timeout=120, poll=0.1)
        assert paths(bj.chains(g.name)["vda"]) == (str(g.disk_path("vda")),)
    g.write("vda", 10 * MiB, MiB, pattern=0x62)
    g.dom.destroy()
    assert images_equal(g.disk_path("vda"), g.shadow_copy("vda", tmp_path / "now.raw"))


# --- pure decisions (no libvirt) ---------------------------------------------------------------

def _row(id_: int, target: str, path: str, state: str):
    from datetime import datetime

    from virtwarden.catalog.overlays import OverlayView

    return OverlayView(id_, "job", "dom", target, path, "/d/vda.qcow2", state, datetime.now(UTC))


def _layers(*paths_: str):
    from virtwarden.hypervisor.blockjobs import Layer

    return tuple(Layer(p, "qcow2") for p in paths_)


T0, T1 = "/d/vda.virtwarden-20260101T000000-aaaaaaaa.qcow2", "/d/vda.virtwarden-20260102T000000-bbbbbbbb.qcow2"
TOKEN0, TOKEN1 = "virtwarden-20260101T000000-aaaaaaaa", "virtwarden-20260102T000000-bbbbbbbb"


@pytest.mark.parametrize("state, chain, heads, expected", [
    # A dead run's overlay is the active image: merge it back (active commit).
    ("created", (T1, T0, "/d/vda.qcow2"), {TOKEN0}, ("rollback", "", False)),
    # ... unless its point completed before the worker died: it is the tracker.
    ("created", (T1, T0, "/d/vda.qcow2"), {TOKEN1}, ("promote", "", False)),
    # The snapshot never happened: close the row, delete the file if libvirt left one.
    ("created", (T0, "/d/vda.qcow2"), {TOKEN0}, ("close", "abandoned", True)),
    # A merge finished but the journal was not updated.
    ("merging", (T0, "/d/vda.qcow2"), {TOKEN0}, ("close", "committed", True)),
    # A merge cut short under the new tracker: merge again.
    ("merging", (T0, T1, "/d/vda.qcow2"), {TOKEN0}, ("merge", "", False)),
    # A tracker someone else removed from the chain: closed, its file kept.
    ("tracking", ("/d/vda.qcow2",), {TOKEN1}, ("close", "abandoned", False)),
    # A tracker in place: nothing to do.
    ("tracking", (T1, "/d/vda.qcow2"), {TOKEN1}, None),
])
def test_plan_reconcile(state, chain, heads, expected):
    from virtwarden.tasks.overlays import plan_reconcile

    actions = plan_reconcile([_row(1, "vda", T1, state)], {"vda": _layers(*chain)}, heads)
    if expected is None:
        assert actions == []
    else:
        assert [(a.kind, a.state, a.delete_file) for a in actions] == [expected]
        if expected[0] == "merge":
            assert actions[0].base == "/d/vda.qcow2"


def test_only_one_chain_changing_action_at_a_time():
    from virtwarden.tasks.overlays import plan_reconcile

    rows = [_row(1, "vda", T1, "created"), _row(2, "vdb", T1.replace("vda", "vdb"), "created"),
            _row(3, "vdc", T0.replace("vda", "vdc"), "merging")]
    chains = {"vda": _layers(T1, "/d/vda.qcow2"), "vdb": _layers(T1.replace("vda", "vdb"), "/d/vdb.qcow2"),
              "vdc": _layers("/d/vdc.qcow2")}
    assert [(a.kind, a.row.id) for a in plan_reconcile(rows, chains, set())] == [("close", 3), ("rollback", 1)]


def test_overlay_names_stay_short_and_carry_the_token():
    from virtwarden.tasks.blockcommit import overlay_path
    from virtwarden.tasks.overlays import overlay_token

    assert overlay_path(_layers("/d/vda.qcow2"), set(), TOKEN1) == T1
    assert overlay_path(_layers(T0, "/d/vda.qcow2"), {T0}, TOKEN1) == T1  # named after the base, not T0
    assert overlay_path(_layers("/d/disk"), set(), TOKEN1) == f"/d/disk.{TOKEN1}.qcow2"
    assert overlay_token(T1) == TOKEN1
    assert overlay_token("/d/vda.qcow2") is None


def test_an_incremental_needs_every_disk_on_its_tracker():
    from virtwarden.hypervisor.types import Disk, DomainInfo
    from virtwarden.tasks.blockcommit import chain_break

    dom = DomainInfo("dom", "u", "running", True, (Disk("vda", T0, "qcow2", "file", 1),), "<domain/>")
    tracker = [_row(1, "vda", T0, "tracking")]
    assert chain_break(TOKEN0, dom, {"vda": _layers(T0, "/d/vda.qcow2")}, tracker) is None
    assert "active image of vda is /d/vda.qcow2" in chain_break(TOKEN0, dom, {"vda": _layers("/d/vda.qcow2")}, tracker)
    assert "no overlay from the last backup" in chain_break(TOKEN0, dom, {"vda": _layers(T0)}, [])
    assert "abandoned" in chain_break(TOKEN0, dom, {"vda": _layers(T0)}, [_row(1, "vda", T0, "abandoned")])
