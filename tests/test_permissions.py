"""File modes and secret files, without services: whatever the umask, the repository,
scratch copies, staged images and the SQLite catalog are private (0600/0700), a
read group or the service group opens exactly what it should, and files holding
secrets that others can read are named (issue 10, findings 4 and 7)."""
from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import text
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor.libvirt_host import qemu_user_from
from virtwarden.storage_backends.nfs import NfsBackend

from tests.conftest import need
from virtwarden import permissions
from virtwarden.config import NfsStorage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _own_policy():
    """Each test starts from the defaults, under a umask that would leave everything
    open: the modes must come from the product, not from the umask."""
    saved, old_umask = permissions.current(), os.umask(0)
    permissions._policy = permissions.Policy()
    yield
    permissions._policy = saved
    os.umask(old_umask)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tree(root: Path) -> dict[str, int]:
    out = {".": mode(root)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = mode(p)
    return out


def a_group() -> tuple[str, int]:
    for name in ("daemon", "nogroup", "users", "adm"):
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    need(False, "no group to test with")
    raise AssertionError("not reached")


def _exercise(backend: NfsBackend, tmp_path: Path) -> None:
    backend.put_bytes("web01/c1/p1/manifest.json", b"{}")
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 1000)
    backend.put_file("web01/c1/p1/vdb.qcow2", source)
    staged = backend.stage("web01/c1/p2/vda.qcow2")
    # What libvirt does: it creates the target itself, through its own umask.
    fd = os.open(staged, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"image")
    os.close(fd)
    os.chmod(staged, 0o644)
    backend.publish_staged("web01/c1/p2/vda.qcow2", staged)
    backend.get_file("web01/c1/p2/vda.qcow2", tmp_path / "scratch" / "job-1" / "vda.qcow2")


def test_the_repository_and_scratch_copies_are_private_whatever_the_umask(tmp_path):
    root = tmp_path / "repository"
    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(root), create=True))
    _exercise(backend, tmp_path)
    found = tree(root)
    assert set(found) >= {".", "web01", "web01/c1/p1/manifest.json", "web01/c1/p1/vdb.qcow2", "web01/c1/p2/vda.qcow2"}
    loose = {k: oct(v) for k, v in found.items() if v != (0o700 if (root / k).is_dir() else 0o600)}
    assert loose == {}
    scratch = tmp_path / "scratch"
    assert tree(scratch) == {".": 0o700, "job-1": 0o700, "job-1/vda.qcow2": 0o600}


def test_a_read_group_reads_the_repository(tmp_path):
    group, gid = a_group()
    permissions.configure(read_group=group)
    root = tmp_path / "repository"
    _exercise(NfsBackend("nfs", NfsStorage(type="nfs", path=str(root), create=True)), tmp_path)
    for path in [root, *root.rglob("*")]:
        assert mode(path) == (0o750 if path.is_dir() else 0o640), path
        if os.geteuid() == 0:
            assert path.stat().st_gid == gid, path


def test_an_unknown_group_is_a_configuration_error():
    from virtwarden.errors import ConfigError

    with pytest.raises(ConfigError, match=r"security.read_group: no group 'no-such-group-x' .*groupadd"):
        permissions.configure(read_group="no-such-group-x")


def test_the_sqlite_catalog_and_its_wal_are_private(tmp_path):
    db = tmp_path / "data" / "catalog.db"
    cat = Catalog(f"sqlite:///{db}")
    with cat.session() as s:
        s.execute(text("SELECT 1"))
    files = {p.name: mode(p) for p in db.parent.iterdir()}
    cat.close()
    assert files["catalog.db"] == 0o600 and mode(db.parent) == 0o700
    assert all(m == 0o600 for name, m in files.items()), files  # -wal, -shm, the upgrade lock


def test_a_catalog_left_readable_by_an_older_release_is_closed_when_opened(tmp_path):
    db = tmp_path / "catalog.db"
    Catalog(f"sqlite:///{db}").close()
    os.chmod(db, 0o644)
    Catalog(f"sqlite:///{db}").close()
    assert mode(db) == 0o600


def test_the_service_group_shares_the_sqlite_catalog(tmp_path):
    group, gid = a_group()
    permissions.configure(service_group=group)
    db = tmp_path / "data" / "catalog.db"
    Catalog(f"sqlite:///{db}").close()
    assert mode(db) == 0o660 and mode(db.parent) == 0o770
    if os.geteuid() == 0:
        assert db.stat().st_gid == gid and db.parent.stat().st_gid == gid


def test_an_unprivileged_qemu_may_pass_through_but_not_list(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "a", 0o700)
    assert permissions.let_qemu_through([deep]) == []  # QEMU as root: nothing changes
    assert permissions.allow_qemu_passage(64055)
    try:
        changed = permissions.let_qemu_through([deep])
        assert deep in changed and tmp_path / "a" in changed
        assert mode(deep) == mode(tmp_path / "a") == 0o701
        backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repo"), create=True))
        backend.put_bytes("d/c/p/manifest.json", b"{}")
        assert mode(tmp_path / "repo" / "d" / "c" / "p") == 0o711
        assert mode(tmp_path / "repo" / "d" / "c" / "p" / "manifest.json") == 0o600
        assert os.umask(0o066) == 0o066  # files 0600, directories 0711
    finally:
        assert not permissions.allow_qemu_passage(0)
    assert os.umask(0) == 0o077


def test_qemu_user_comes_from_libvirts_dac_label():
    caps = ET.fromstring("""<capabilities><host>
        <secmodel><model>apparmor</model><doi>0</doi></secmodel>
        <secmodel><model>dac</model><doi>0</doi>
          <baselabel type='kvm'>+64055:+994</baselabel><baselabel type='qemu'>+64055:+994</baselabel>
        </secmodel></host></capabilities>""")
    assert qemu_user_from(caps) == (64055, 994)
    assert qemu_user_from(ET.fromstring("<capabilities><host/></capabilities>")) is None


def test_a_domains_own_dac_label_says_which_user_its_qemu_runs_as():
    from virtwarden.hypervisor.libvirt_host import domain_qemu_user

    def live(label: str) -> ET.Element:
        return ET.fromstring(f"<domain><name>d</name><seclabel type='dynamic' model='apparmor'><label>x</label>"
                             f"</seclabel><seclabel type='static' model='dac' relabel='yes'><label>{label}</label>"
                             "</seclabel></domain>")

    assert domain_qemu_user(live("+64055:+994")) == (64055, 994)
    assert domain_qemu_user(live("root:root")) == (0, 0)  # names are looked up
    assert domain_qemu_user(live("no-such-user-here:root")) is None
    assert domain_qemu_user(ET.fromstring("<domain><name>d</name></domain>")) is None  # the host's, then


@pytest.mark.parametrize("file_mode, reason", [
    (0o600, None),
    (0o400, None),
    (0o644, "readable by every local user (mode 0644)"),
    (0o602, "writable by every local user (mode 0602)"),
    (0o660, "writable by group"),
])
def test_exposure_of_a_secret_file(tmp_path, file_mode, reason):
    path = tmp_path / "secret"
    path.write_text("s")
    os.chmod(path, file_mode)
    found = permissions.exposure(path)
    assert (found is None) if reason is None else (reason in found)


def test_only_the_service_group_may_read_a_secret_file(tmp_path):
    need(os.geteuid() == 0, "chgrp to another group needs root")
    group, gid = a_group()
    path = tmp_path / "config.yaml"
    path.write_text("s")
    os.chown(path, 0, gid)
    os.chmod(path, 0o640)
    assert f"readable by group {group} (mode 0640)" in permissions.exposure(path)
    permissions.configure(service_group=group)
    assert permissions.exposure(path) is None
    os.chown(path, 0, 0)
    assert permissions.exposure(path) is None  # root's own group


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTWARDEN_")}
    return subprocess.run([sys.executable, "-c", "import os, sys\nfrom virtwarden.cli.main import main\n"
                           "code = main(sys.argv[1:])\nprint('umask', oct(os.umask(0)))\nsys.exit(code)",
                           "--config", str(config), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_configuration_holding_secrets_that_others_can_read_is_named(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n"
                      "database_url: postgresql://vw:s3cr3t@127.0.0.1:1/vw\n"
                      "storage:\n  offsite: {type: s3, bucket: b, secret_access_key: k}\n")
    os.chmod(config, 0o644)
    r = _cli(config, "policy", "list")
    assert r.returncode == 0, r.stderr
    assert (f"{config} holds storage.offsite.secret_access_key, database_url and is readable by every local "
            f"user (mode 0644); chmod 600 {config}") in r.stderr
    assert "s3cr3t" not in r.stderr
    assert "umask 0o77" in r.stdout  # set before anything runs

    os.chmod(config, 0o600)
    r = _cli(config, "policy", "list")
    assert r.returncode == 0 and "holds" not in r.stderr, r.stderr

    config.write_text(f"data_dir: {tmp_path / 'data'}\n")  # no secret: its mode is the operator's business
    os.chmod(config, 0o644)
    r = _cli(config, "policy", "list")
    assert r.returncode == 0 and "holds" not in r.stderr, r.stderr


def test_errors_printed_by_the_cli_hide_passwords(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\ndatabase_url: postgresql+psycopg2://vw:s3cr3t@127.0.0.1:1/vw"
                      "?sslpassword=k3y\n")
    os.chmod(config, 0o600)
    r = _cli(config, "jobs")
    assert r.returncode in (3, 5), r.stderr
    assert "s3cr3t" not in r.stderr and "k3y" not in r.stderr
    assert "vw:***@127.0.0.1:1/vw" in r.stderr
