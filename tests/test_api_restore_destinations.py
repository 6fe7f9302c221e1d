"""Restore destinations, with hostile requests through a real ``virtwarden api`` and a
real worker, on a real guest: a to_dir outside restore.allowed_dirs (directly, through
a symbolic link, via a runbook) is refused and nothing is created; a destination
changed after the request was accepted, or a job row that no check saw, is judged
again by the worker; a directory holding a file or a symbolic link is refused and what
the link points to is unchanged; a manifest or catalog whose disk target was edited
to climb out of the directory fails the restore and writes nothing; restored files are
0600 in 0700 directories."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from sqlalchemy import update
from virtwarden.catalog import jobs as job_rows
from virtwarden.catalog.models import Artifact, RestorePoint

from tests.guests import images_equal
from tests.test_api import _audit, _follow, _jobs, api  # noqa: F401 - api is a fixture

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024


def _backed_up(vw, guest_factory, tmp_path: Path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    g.write_random("vda", 0, 2 * MiB)
    r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert r.code == 0, r.err
    return g, r.json()["result"], g.shadow_copy("vda", tmp_path / "expected.raw")


def _hostile_tree(vw, tmp_path: Path) -> tuple[Path, Path]:
    """The default allowed root (<data_dir>/restores) with links inside that lead out,
    and a directory outside holding a file that must never change."""
    root, outside = vw.data_dir / "restores", tmp_path / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_text("precious")
    (root / "escape").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "made-by-a-restore")
    return root, outside


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _stop_workers(vw) -> None:
    for w in vw.workers:
        w.stop()
    vw.workers.clear()


def test_to_dir_outside_the_allowed_dirs_is_refused_with_403_and_nothing_is_created(vw, api, guest_factory,
                                                                                   tmp_path):
    g, point, expected = _backed_up(vw, guest_factory, tmp_path)
    root, outside = _hostile_tree(vw, tmp_path)
    _stop_workers(vw)  # a request wrongly accepted must not write into /etc or /root: the test fails on the 202
    server = api()
    tag = secrets.token_hex(4)
    hostile = [f"/etc/cron.d/virtwarden-{tag}", f"/root/.ssh/virtwarden-{tag}", f"/root/.ssh/virtwarden-{tag}/x",
               str(tmp_path / "elsewhere"), str(root) + "-sibling",
               str(root / "escape"), str(root / "escape" / "web01"), str(root / "dangling"),
               str(root / "dangling" / "x")]
    ssh_before = os.path.exists("/root/.ssh")
    cron_before = sorted(os.listdir("/etc/cron.d")) if os.path.isdir("/etc/cron.d") else None
    tree_before = _tree(root)
    for to_dir in hostile:
        r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": to_dir})
        assert r.status == 403, (to_dir, r.status, r.body)
        error = r.json()["error"]
        assert f"to_dir {to_dir}" in error and "restore.allowed_dirs" in error and "nothing was created" in error
        assert "missing_scope" not in r.json()
    assert "resolves to " + str(outside / "web01") in server.call(
        "POST", "/v1/restores", {"domain": g.name, "to_dir": str(root / "escape" / "web01")}).json()["error"]
    # '..' never reaches the check: the request itself is malformed.
    assert server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": f"{root}/../../x"}).status == 422

    assert os.path.exists("/root/.ssh") == ssh_before and not os.path.exists(f"/etc/cron.d/virtwarden-{tag}")
    if cron_before is not None:
        assert sorted(os.listdir("/etc/cron.d")) == cron_before
    assert _tree(root) == tree_before and _tree(outside) == ["victim"] and not (tmp_path / "elsewhere").exists()
    assert [j.kind for j in _jobs(vw)] == ["backup"]
    refused = [a for a in _audit(vw) if a.outcome == "refused"]
    assert len(refused) == len(hostile) + 2 and all(a.action == "api.restore" for a in refused)

    # A runbook is confined too, even when root runs it; its dry run says so as well.
    for extra in ([], ["--dry-run"]):
        r = vw.cli("runbook", "run", "restore-latest", "-p", f"domain={g.name}",
                   "-p", f"to_dir=/etc/cron.d/virtwarden-{tag}", *extra)
        assert r.code == 1 and "outside the directories restores may write to" in r.out + r.err, r.out + r.err
    assert not os.path.exists(f"/etc/cron.d/virtwarden-{tag}")
    assert [j.kind for j in _jobs(vw) if j.kind != "runbook"] == ["backup"]

    # Under the allowed root: restored bit for bit, files 0600 in 0700 directories.
    vw.start_worker()
    out = root / "web01" / "latest"
    r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(out)})
    assert r.status == 202, r.body
    job = _follow(server, r.json()["job_id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["disks"] == [str(out / "vda.qcow2")]
    assert images_equal(out / "vda.qcow2", expected)
    assert sorted(os.listdir(out)) == ["domain.xml", "vda.qcow2"]  # no staging directory left
    modes = {p: oct(p.stat().st_mode & 0o777) for p in (root / "web01", out, out / "vda.qcow2", out / "domain.xml")}
    assert list(modes.values()) == ["0o700", "0o700", "0o600", "0o600"], modes
    [restore] = [j for j in _jobs(vw) if j.kind == "restore"]
    assert restore.params["confined"] is True


def test_the_worker_judges_the_destination_again_right_before_it_writes(vw, api, guest_factory, tmp_path):
    """Requests accepted while their destination was harmless, whose destination is then
    changed before a worker runs them, and job rows no check ever saw (a submission path
    that does not check, a row written into the catalog): the worker refuses each."""
    g, point, _ = _backed_up(vw, guest_factory, tmp_path)
    root, outside = _hostile_tree(vw, tmp_path)
    _stop_workers(vw)
    server = api()

    def accepted(to_dir: Path) -> str:
        r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(to_dir)})
        assert r.status == 202, r.body
        return r.json()["job_id"]

    swapped = accepted(root / "a" / "out")
    (root / "a").symlink_to(outside)  # the missing parent appears as a link that leads out
    planted = accepted(root / "b")
    (root / "b").mkdir()
    (root / "b" / "domain.xml").symlink_to(outside / "victim")  # a link where domain.xml goes
    cat = vw.catalog()
    unchecked = job_rows.create(cat, kind="restore", domain=g.name, host="local", resend_after=0,
                                params={"domain": g.name, "point": point["point_id"],
                                        "to_dir": str(tmp_path / "unchecked")}).id  # no "confined": confined
    forged = job_rows.create(cat, kind="restore", domain=g.name, host="local", resend_after=0,
                             params={"domain": g.name, "point": point["point_id"], "confined": True,
                                     "to_dir": str(root / "escape" / "forged")}).id
    vw.start_worker()

    errors = {}
    for job_id in (swapped, planted, unchecked, forged):
        done = _follow(server, job_id)
        assert done["state"] == "failed", done
        assert done["attempts"] == 1 and done["result"]["error_type"] in ("DestinationRefused", "RestoreRefused")
        errors[job_id] = done["error"]
    assert f"resolves to {outside / 'out'}" in errors[swapped] and "restore.allowed_dirs" in errors[swapped]
    assert f"{root / 'b'} already holds domain.xml" in errors[planted]
    assert f"to_dir {tmp_path / 'unchecked'} is outside" in errors[unchecked]
    assert f"resolves to {outside / 'forged'}" in errors[forged]
    assert (outside / "victim").read_text() == "precious" and _tree(outside) == ["victim"]
    assert not (tmp_path / "unchecked").exists()
    assert _tree(root / "b") == ["domain.xml"] and (root / "b" / "domain.xml").is_symlink()


def test_a_to_dir_that_holds_a_file_or_a_link_is_refused_and_what_it_points_to_is_unchanged(vw, api,
                                                                                          guest_factory, tmp_path):
    g, _, _ = _backed_up(vw, guest_factory, tmp_path)
    root, outside = _hostile_tree(vw, tmp_path)
    (root / "held").mkdir()
    (root / "held" / "domain.xml").symlink_to(outside / "victim")
    (root / "taken").mkdir()
    (root / "taken" / "vda.qcow2").write_bytes(b"someone else's")
    server = api()
    for name, held in (("held", "domain.xml"), ("taken", "vda.qcow2")):
        r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(root / name)})
        assert r.status == 422, r.body
        assert f"{root / name} already holds {held}; choose a new or empty directory" in r.json()["error"]
    # Root at the command line may write anywhere, but not over anything either.
    r = vw.cli("restore", g.name, "--to-dir", str(root / "held"), "--wait")
    assert r.code == 1 and "already holds domain.xml" in r.err, r.err
    r = vw.cli("restore", g.name, "--to-dir", str(outside), "--wait")
    assert r.code == 1 and "already holds victim" in r.err, r.err
    assert (outside / "victim").read_text() == "precious" and _tree(outside) == ["victim"]
    assert (root / "taken" / "vda.qcow2").read_bytes() == b"someone else's"
    assert [j.kind for j in _jobs(vw)] == ["backup"]
    # Outside the allowed roots, root's own restore still goes where it was asked.
    out = tmp_path / "by-root"
    assert vw.cli("restore", g.name, "--to-dir", str(out), "--wait").code == 0
    [job] = [j for j in _jobs(vw) if j.kind == "restore"]
    assert job.params["confined"] is False and sorted(os.listdir(out)) == ["domain.xml", "vda.qcow2"]


def test_a_disk_target_edited_to_climb_out_fails_the_restore_and_writes_nothing(vw, api, guest_factory, tmp_path):
    """The issue's reproduction: a manifest whose target is ``../../ESCAPED`` made a
    restore write ``<to_dir>/../../ESCAPED.qcow2``. The point here predates manifest
    checksums (the catalog has none), so the manifest is compared with the catalog
    only; then the catalog row is forged as well."""
    g, point, _ = _backed_up(vw, guest_factory, tmp_path)
    root, _ = _hostile_tree(vw, tmp_path)
    listed = vw.cli("backups", g.name, "--json").json()[-1]
    manifest = vw.storage_path("nfs") / g.name / listed["chain_id"] / listed["id"] / "manifest.json"
    with vw.catalog().session() as s:
        s.execute(update(RestorePoint).where(RestorePoint.id == listed["id"]).values(manifest_sha256=None))
    _stop_workers(vw)
    server = api()
    out = root / "web01" / "edited"
    r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(out)})
    assert r.status == 202, r.body  # the manifest is edited after the request was accepted
    data = json.loads(manifest.read_text())
    data["disks"][0]["target"] = "../../ESCAPED"
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    vw.start_worker()
    done = _follow(server, r.json()["job_id"])
    assert done["state"] == "failed" and done["result"]["error_type"] == "ChecksumMismatch", done
    assert "disk target '../../ESCAPED' is not the catalog's" in done["error"] and "nothing was written" in done[
        "error"]
    # Asked now, the request itself is refused.
    again = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(root / "again")})
    assert again.status == 422 and "disk target '../../ESCAPED' is not the catalog's" in again.json()["error"]

    # The catalog forged to agree: the target is no disk name, whoever asks (root too).
    with vw.catalog().session() as s:
        s.execute(update(Artifact).where(Artifact.point_id == listed["id"]).values(target="../../ESCAPED"))
    r = vw.cli("restore", g.name, "--to-dir", str(tmp_path / "by-root" / "x" / "y"), "--wait")
    assert r.code == 1 and "disk target '../../ESCAPED' is not a disk name libvirt gives" in r.err, r.err
    drill = vw.cli("drill", g.name, "--wait")
    assert drill.code == 1 and "is not a disk name libvirt gives" in drill.out, drill.out + drill.err

    assert not out.exists() and not (root / "again").exists() and not (tmp_path / "by-root").exists()
    assert list(tmp_path.rglob("*ESCAPED*")) == []  # tmp_path holds the data dir and the repository
    assert not list(vw.scratch.rglob("*.qcow2"))
