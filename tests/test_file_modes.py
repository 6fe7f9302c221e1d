"""Backups are readable by their owner only: a real worker backs a running guest up to
a local-directory repository and restores it, and every file and directory it made,
the catalog included, is walked and its mode checked (issue 10, finding 4)."""
from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import need
from tests.guests import images_equal

pytestmark = pytest.mark.libvirt
MiB = 1024 * 1024


def _modes(root: Path) -> dict[Path, tuple[int, int, bool]]:
    """Every entry under ``root`` (and ``root``): (mode, gid, is a directory)."""
    found = {}
    for where, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(where) / name if name != "." else Path(where)
            st = os.lstat(path)
            found[path] = (stat.S_IMODE(st.st_mode), st.st_gid, stat.S_ISDIR(st.st_mode))
    return found


def _loose(root: Path, file_mode: int = 0o600, dir_mode: int = 0o700) -> list[str]:
    return [f"{p} {m:04o}" for p, (m, _gid, is_dir) in _modes(root).items()
            if m != (dir_mode if is_dir else file_mode)]


def _umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc status")


def _backup_and_restore(vw, g, tmp_path: Path) -> Path:
    g.write_random("vda", 0, 2 * MiB)
    for _ in range(2):  # a full and an incremental: staged by libvirt into the repository
        r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
        assert r.code == 0, r.err
    g.write("vda", 4 * MiB, 1 * MiB, pattern=0x42)
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")
    r = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert r.code == 0, r.err
    out = tmp_path / "restored" / g.name
    r = vw.cli("restore", g.name, "--to-dir", str(out), "--wait")
    assert r.code == 0, r.err
    assert images_equal(out / "vda.qcow2", expected)
    return out


def test_backup_and_restore_leave_nothing_readable_by_others(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    worker = vw.start_worker()
    assert _umask(worker.proc.pid) == 0o077
    out = _backup_and_restore(vw, g, tmp_path)

    repository = vw.storage_path("nfs")
    tree = _modes(repository)
    assert any(p.name == "vda.qcow2" for p in tree) and any(p.name == "manifest.json" for p in tree)
    assert _loose(repository) == [], "repository entries readable by others"
    # The data directory: the catalog and its WAL, scratch space, lock files.
    assert _loose(vw.data_dir) == [], "data directory entries readable by others"
    assert stat.S_IMODE(os.stat(vw.data_dir / "catalog.db").st_mode) == 0o600
    # What the restore wrote (images through qemu-img, domain.xml) is private too.
    assert _loose(out) == [], "restored files readable by others"
    assert stat.S_IMODE(os.stat(out.parent).st_mode) == 0o700


def _some_group() -> tuple[str, int]:
    for name in ("daemon", "nogroup", "users", "adm"):
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    need(False, "no group to read with")
    raise AssertionError("not reached")


def test_read_group_may_read_the_repository_and_nothing_else(vw, guest_factory, tmp_path):
    group, gid = _some_group()
    vw.extra["security"] = {"read_group": group}
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    _backup_and_restore(vw, g, tmp_path)

    repository = vw.storage_path("nfs")
    assert _loose(repository, 0o640, 0o750) == []
    assert {gid_ for _m, gid_, _d in _modes(repository).values()} == {gid}
    # The catalog is not the read group's: it stays private.
    assert stat.S_IMODE(os.stat(vw.data_dir / "catalog.db").st_mode) == 0o600
