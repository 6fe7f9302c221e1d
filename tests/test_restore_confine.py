"""Where restores may write and how they create files, on plain files (no services):
confinement to restore.allowed_dirs after symbolic links are resolved, exclusive
creation that never follows or replaces a name, modes, the clean-up of a failed or dead
attempt, disk targets checked against the catalog and libvirt's disk names, and the
configuration that names the allowed directories."""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from virtwarden.tasks import confine as confine_module
from virtwarden.tasks.confine import IMAGE_DIR, TARGET, NewDir, check_target, confine

from virtwarden import config
from virtwarden.errors import ChecksumMismatch, ConfigError, DestinationRefused, RestoreRefused, UnsafeTarget


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


@pytest.fixture
def roots(tmp_path):
    """An allowed root with a symbolic link inside that leads outside it, and a file
    outside that must never change."""
    root, outside = tmp_path / "restores", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("precious")
    (root / "escape").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "not-yet")
    return root, outside


# --- confinement ------------------------------------------------------------------------------
def test_a_destination_must_resolve_under_an_allowed_root(roots, tmp_path):
    root, outside = roots
    allowed = (str(root),)
    assert confine(str(root / "web01"), allowed) == str(root / "web01")
    assert confine(str(root / "a" / "b" / "c"), allowed) == str(root / "a" / "b" / "c")
    assert confine(str(root), allowed) == str(root)
    refused = {
        "/etc/cron.d/x": "is outside",
        "/root/.ssh/x": "is outside",
        str(tmp_path / "restores-other"): "is outside",  # a sibling sharing the prefix
        str(root / "escape"): f"resolves to {outside}",
        str(root / "escape" / "web01"): f"resolves to {outside / 'web01'}",
        str(root / "dangling" / "x"): f"resolves to {outside / 'not-yet' / 'x'}",
        str(root / ".." / "outside"): "contains '..'",
        f"{root}/web01/../../outside": "contains '..'",
        "relative/dir": "absolute path",
    }
    for path, why in refused.items():
        with pytest.raises(DestinationRefused, match="nothing was created") as e:
            confine(path, allowed)
        assert why in str(e.value), (path, str(e.value))
        assert e.value.exit_code == 1
    with pytest.raises(DestinationRefused, match="restore.allowed_dirs is empty"):
        confine(str(root / "x"), ())
    assert sorted(p.name for p in root.iterdir()) == ["dangling", "escape"]  # nothing was created
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_an_allowed_root_that_is_itself_a_symbolic_link_is_resolved_too(tmp_path):
    real = tmp_path / "data" / "restores"
    real.mkdir(parents=True)
    (tmp_path / "srv").symlink_to(tmp_path / "data")
    assert confine(str(tmp_path / "srv" / "restores" / "x"), (str(tmp_path / "srv" / "restores"),)) == \
        str(real / "x")
    assert confine(str(real / "x"), (str(tmp_path / "srv" / "restores"),)) == str(real / "x")


# --- creation ---------------------------------------------------------------------------------
def test_files_are_0600_in_new_0700_directories_and_named_only_when_published(roots):
    root, _ = roots
    dest = root / "a" / "b"
    old = os.umask(0)  # the modes are the restore's, whatever the umask
    try:
        with NewDir(str(dest), job_id="j1", roots=(str(root),)) as out:
            fd = out.create("vda.qcow2")
            os.write(fd, b"image")
            os.close(fd)
            out.write_text("domain.xml", "<domain/>")
            assert os.listdir(dest) == [".virtwarden-restore-j1"]  # nothing under its name yet
            assert _mode(dest / ".virtwarden-restore-j1") == 0o700
            written = out.publish()
    finally:
        os.umask(old)
    assert written == [str(dest / "vda.qcow2"), str(dest / "domain.xml")]
    assert sorted(os.listdir(dest)) == ["domain.xml", "vda.qcow2"]
    assert (_mode(root / "a"), _mode(dest)) == (0o700, 0o700)
    assert (_mode(dest / "vda.qcow2"), _mode(dest / "domain.xml")) == (0o600, 0o600)
    assert (dest / "domain.xml").read_text() == "<domain/>"

    with NewDir(str(root / "images"), job_id="j2", mode=IMAGE_DIR, empty=False) as out:
        out.write_text("copy-vda.qcow2", "x")
        out.publish()
    assert (_mode(root / "images"), _mode(root / "images" / "copy-vda.qcow2")) == (0o711, 0o600)


def test_a_directory_that_is_not_new_or_empty_is_refused_and_left_as_it_was(roots):
    root, outside = roots
    held = root / "held"
    held.mkdir()
    (held / "domain.xml").symlink_to(outside / "victim")
    with (pytest.raises(RestoreRefused, match=r"already holds domain.xml; choose a new or empty directory"),
          NewDir(str(held), job_id="j", roots=(str(root),))):
        pass
    assert os.listdir(held) == ["domain.xml"] and (outside / "victim").read_text() == "precious"
    (root / "file").write_text("x")
    with (pytest.raises(RestoreRefused, match="is not a directory"),
          NewDir(str(root / "file"), job_id="j", roots=(str(root),))):
        pass


def test_a_name_taken_while_the_restore_ran_is_never_written_through_or_replaced(roots):
    root, outside = roots
    dest = root / "race"
    for planted in ("symlink", "file"):
        with (pytest.raises(RestoreRefused, match=f"{dest / 'domain.xml'} (already exists|appeared)"),
              NewDir(str(dest), job_id="j", roots=(str(root),)) as out):
            fd = out.create("vda.qcow2")
            os.close(fd)
            out.write_text("domain.xml", "<evil/>")
            if planted == "symlink":  # someone plants a link to a file of theirs, or of root's
                (dest / "domain.xml").symlink_to(outside / "victim")
            else:
                (dest / "domain.xml").write_text("someone else's")
            out.publish()
        assert (outside / "victim").read_text() == "precious"
        # What the restore created is gone; what it found stays.
        assert os.listdir(dest) == ["domain.xml"]
        kept = (dest / "domain.xml")
        assert kept.is_symlink() if planted == "symlink" else kept.read_text() == "someone else's"
        kept.unlink()
        dest.rmdir()


def test_a_failed_restore_removes_what_it_created_and_only_that(roots):
    root, _ = roots
    with pytest.raises(RuntimeError), NewDir(str(root / "new" / "deeper"), job_id="j", roots=(str(root),)) as out:
        out.write_text("vda.qcow2", "half")
        raise RuntimeError("qemu-img failed")
    assert sorted(p.name for p in root.iterdir()) == ["dangling", "escape"]
    kept = root / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), NewDir(str(kept), job_id="j", roots=(str(root),)) as out:
        out.write_text("vda.qcow2", "x")
        out.publish()
        raise RuntimeError("defining the domain failed")
    assert kept.is_dir() and os.listdir(kept) == []  # found empty, left empty


def test_an_attempt_that_starts_again_removes_what_the_dead_one_left(roots):
    root, _ = roots
    dest = root / "retry"
    dead = NewDir(str(dest), job_id="job1", roots=(str(root),))
    dead.open()
    dead.write_text("vda.qcow2", "complete")
    dead.write_text("domain.xml", "x")
    os.link(dest / ".virtwarden-restore-job1" / "vda.qcow2", dest / "vda.qcow2")  # it died while naming them
    dead.close()  # nothing cleaned: the process is gone
    with (pytest.raises(RestoreRefused, match="already holds .virtwarden-restore-job1, vda.qcow2"),  # not its own
          NewDir(str(dest), job_id="job2", roots=(str(root),))):
        pass
    with NewDir(str(dest), job_id="job1", roots=(str(root),)) as out:
        out.write_text("vda.qcow2", "again")
        out.write_text("domain.xml", "y")
        out.publish()
    assert sorted(os.listdir(dest)) == ["domain.xml", "vda.qcow2"]
    assert (dest / "vda.qcow2").read_text() == "again"


def test_the_directory_opened_is_judged_again_where_it_really_is(roots, monkeypatch):
    """A symbolic link swapped in after the request was judged (here: the first check is
    skipped, as if the link appeared right after it) is caught on the opened directory."""
    root, outside = roots
    monkeypatch.setattr(confine_module, "confine", lambda path, roots, what="to_dir": path)
    with (pytest.raises(DestinationRefused, match=f"led to {outside / 'x'} when it was opened"),
          NewDir(str(root / "escape" / "x"), job_id="j", roots=(str(root),))):
        pass
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]  # the directory it made is gone again


def test_an_unconfined_restore_may_go_anywhere_but_only_into_a_new_or_empty_directory(roots, tmp_path):
    _, outside = roots
    with NewDir(str(tmp_path / "anywhere"), job_id="j") as out:
        out.write_text("domain.xml", "x")
        out.publish()
    with pytest.raises(RestoreRefused, match="already holds victim"), NewDir(str(outside), job_id="j"):
        pass


# --- disk targets -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["vda", "vdb", "vdaa", "sda", "hdc", "xvda", "fda", "ubda", "vdzzz"])
def test_disk_names_libvirt_gives_are_targets(target):
    assert check_target(target, "p1") == target


@pytest.mark.parametrize("target", ["../../ESCAPED", "vda/../../x", "", "vd", "VDA", "vda1", "nvme0n1", ".vda",
                                    "vda.qcow2", "sda\n", None, 3])
def test_anything_else_is_refused_as_a_target(target):
    assert not (isinstance(target, str) and TARGET.fullmatch(target))
    with pytest.raises(UnsafeTarget, match="is not a disk name libvirt gives"):
        check_target(target, "p1")


def _point(target: str):
    from virtwarden.catalog.points import ArtifactView, PointView

    return PointView(id="p1", domain="web01", domain_uuid="u", host="local", storage="nfs", strategy="bitmap",
                     chain_id="c", parent_id=None, seq=0, level="full", status="complete", reason=None,
                     consistency="crash", checkpoint=None, manifest_key="web01/c/p1/manifest.json", size_bytes=1,
                     job_id=None, created_at=datetime(2025, 3, 30, tzinfo=UTC), completed_at=None,
                     artifacts=(ArtifactView(target, "web01/c/p1/vda.qcow2", 1, "s", 1),))


def _manifest(target: str) -> dict:
    return {"point_id": "p1", "disks": [{"target": target, "key": "web01/c/p1/vda.qcow2", "sha256": "s"}]}


def test_manifest_targets_must_be_the_catalogs_and_disk_names():
    from virtwarden.tasks.restore import _check_matches_catalog

    _check_matches_catalog([_point("vda")], [_manifest("vda")])
    with pytest.raises(ChecksumMismatch, match=r"disk target '\.\./\.\./ESCAPED' is not the catalog's") as e:
        _check_matches_catalog([_point("vda")], [_manifest("../../ESCAPED")])
    assert "nothing was written" in str(e.value)
    with pytest.raises(ChecksumMismatch, match="does not match the catalog"):
        _check_matches_catalog([_point("vda")], [_manifest("vdb")])
    with pytest.raises(UnsafeTarget, match=r"'\.\./\.\./ESCAPED' is not a disk name"):  # a forged catalog row too
        _check_matches_catalog([_point("../../ESCAPED")], [_manifest("../../ESCAPED")])


def test_a_catalog_rebuild_never_imports_a_target_that_is_no_disk_name():
    from virtwarden.tasks.rebuild import _artifact

    disk = {"target": "vda", "key": "k", "size_bytes": 1, "sha256": "s", "virtual_size": 1}
    assert _artifact(disk, 0).target == "vda"
    with pytest.raises(ValueError, match=r"disks\[0\]\.target: '\.\./\.\./ESCAPED' is not a disk name"):
        _artifact({**disk, "target": "../../ESCAPED"}, 0)


# --- planning and who is confined --------------------------------------------------------------
def test_a_plan_into_a_directory_needs_a_new_or_empty_one(tmp_path):
    from virtwarden.tasks.restore_plan import _new_or_empty

    _new_or_empty(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    _new_or_empty(str(tmp_path / "empty"))
    (tmp_path / "empty" / ".virtwarden-restore-job1").mkdir()  # a dead attempt's: its job's retry clears it
    _new_or_empty(str(tmp_path / "empty"))
    (tmp_path / "empty" / "domain.xml").symlink_to("/etc/passwd")
    with pytest.raises(RestoreRefused, match="already holds domain.xml"):
        _new_or_empty(str(tmp_path / "empty"))


def test_only_root_at_the_command_line_restores_outside_the_allowed_dirs():
    from virtwarden.submit.restore import restore_confined

    assert restore_confined(0) is False
    assert restore_confined(1000) is True


# --- configuration ----------------------------------------------------------------------------
def test_allowed_dirs_default_to_restores_under_the_data_dir(tmp_path):
    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": str(tmp_path)})
    assert cfg.restore.allowed_dirs is None and cfg.restore_roots == (str(tmp_path / "restores"),)
    f = tmp_path / "c.yaml"
    f.write_text("restore:\n  allowed_dirs: [/srv/restore, /var/tmp/restores/]\n")
    assert config.load(str(f), env={}).restore_roots == ("/srv/restore", "/var/tmp/restores")
    f.write_text("restore:\n  allowed_dirs: []\n")
    assert config.load(str(f), env={}).restore_roots == ()


@pytest.mark.parametrize("value, message", [
    ("[srv/restore]", "'srv/restore' is not an absolute path"),
    ("[/srv/restore/../../etc]", "is not a normalised path"),
    ("[/srv//restore]", "is not a normalised path"),
    ("[/]", "would let restores write anywhere"),
    ("/srv/restore", "Input should be a valid tuple"),
])
def test_bad_allowed_dirs_are_reported_by_line(tmp_path, value, message):
    f = tmp_path / "c.yaml"
    f.write_text(f"data_dir: /srv/vw\nrestore:\n  allowed_dirs: {value}\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(f), env={})
    assert "c.yaml:3: restore.allowed_dirs" in str(e.value) and message in str(e.value), str(e.value)
    f.write_text("restore:\n  alowed_dirs: [/srv]\n")
    unknown = r"c.yaml:2: restore.alowed_dirs: unknown key \(did you mean 'allowed_dirs'\?\)"
    with pytest.raises(ConfigError, match=unknown):
        config.load(str(f), env={})
