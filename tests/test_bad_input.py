"""Bad input: each gets a clear, specific message and a non-zero exit, and changes nothing
(no job row where none should be, no restore point listed, no checkpoint left behind)."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest

from tests.conftest import need
from tests.harness import TEST_WORKER, s3_storage_entry

pytestmark = pytest.mark.cli_in_process
MiB = 1024 * 1024


def _our_checkpoints(domain: str) -> list[str]:
    import libvirt

    dom = libvirt.open("qemu:///system").lookupByName(domain)
    return [c.getName() for c in dom.listAllCheckpoints() if c.getName().startswith("virtwarden-")]


def test_malformed_config_names_file_line_and_key(vw):
    vw.write_config()
    text = vw.config_path.read_text().replace("hosts:", "hosts:\n  other: {uri: 'qemu:///system', gruop: x}", 1)
    vw.config_path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--config", str(vw.config_path), "jobs"],
                       capture_output=True, text=True)
    assert r.returncode == 3
    assert f"{vw.config_path}:" in r.stderr and "hosts.other.gruop: unknown key (did you mean 'group'?)" in r.stderr
    assert not (vw.data_dir / "catalog.db").exists()


def test_yaml_syntax_error_in_config(vw, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  a: {uri: x\n")
    r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--config", str(bad), "jobs"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and f"{bad}:" in r.stderr and "YAML syntax" in r.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(vw):
    """``virtwarden jobs --json | head``: the reader has gone when the command writes. No
    traceback labelled a bug: exit 141, as a shell reports a command whose pipe closed."""
    import os

    vw.write_config()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--config", str(vw.config_path), "jobs", "--json"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def test_policy_validate_json_locates_each_error(vw, tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("apiVersion: virtwarden/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n"
                   "  backup: {target: nfs, strategy: bitmapp}\n")
    r = vw.cli("policy", "validate", str(bad), "--json")
    assert r.code == 1, r.err
    [error] = r.json()["errors"]
    assert (error["file"], error["line"], error["field"]) == (str(bad), 5, "spec.backup.strategy")
    assert "did you mean 'bitmap'" in error["message"] and r.json()["ok"] is False
    bad.write_text(bad.read_text().replace("bitmapp", "bitmap"))
    r = vw.cli("policy", "validate", str(bad), "--json")
    assert (r.code, r.json()) == (0, {"ok": True, "policies": ["p"], "runbooks": [], "errors": []})


def test_version_names_the_release():
    import virtwarden

    r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--version"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"virtwarden {virtwarden.__version__}\n")


def test_the_completion_script_completes_commands_options_and_choices_in_a_real_bash(tmp_path):
    """``virtwarden completion bash`` sourced into bash: each case is the words typed so
    far (the last one being completed) and what TAB offers."""
    import shutil

    from tests.conftest import need

    need(shutil.which("bash") is not None, "bash")
    script = subprocess.run([sys.executable, "-m", "virtwarden.cli", "completion", "bash"],
                            capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    (tmp_path / "virtwarden.bash").write_text(script.stdout)
    (tmp_path / "hosts.yaml").write_text("")
    cases = {
        "virtwarden sch": "scheduler schedule",
        "virtwarden schedule ''": "preview slots",
        "virtwarden schedule slots --st": "--state",
        "virtwarden schedule slots --state s": "started skipped",
        "virtwarden --log-level ''": "debug info warning error",
        f"virtwarden --config {tmp_path}/hos": f"{tmp_path}/hosts.yaml",
        "virtwarden restore web01 --to-": "--to-dir",
        "virtwarden storage ''": "points restore stats gc",
        "virtwarden nonsense ''": "",
        "virtwarden --config /etc/vw.yaml schedule ''": "preview slots",  # an option's value is no command
        "virtwarden backup web01 --wa": "--wait",
    }
    lines = [f"source {tmp_path}/virtwarden.bash",
             'c() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _virtwarden; echo "${COMPREPLY[*]}"; }']
    lines += [f"c {words}" for words in cases]
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(lines)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert dict(zip(cases, done.stdout.splitlines(), strict=True)) == cases


@pytest.mark.libvirt
def test_unknown_domain(vw, libvirt_uri):
    r = vw.cli("backup", "no-such-domain", "--wait")
    assert r.code == 4
    assert "no domain 'no-such-domain'" in r.err
    assert vw.cli("jobs", "--json").json() == []


@pytest.mark.libvirt
def test_unknown_storage_name(vw, guest_factory):
    g = guest_factory(disks=1, size_mib=16)
    r = vw.cli("backup", g.name, "--target", "nsf", "--wait")
    assert r.code == 4
    assert "storage 'nsf' is not configured (did you mean 'nfs'?)" in r.err
    assert vw.cli("jobs", "--json").json() == []


@pytest.mark.libvirt
def test_dead_broker(vw, guest_factory):
    g = guest_factory(disks=1, size_mib=16)
    vw.extra["broker_url"] = "redis://127.0.0.1:1/0"
    r = vw.cli("backup", g.name, "--wait")
    assert r.code == 5
    assert "broker redis://127.0.0.1:1/0 unreachable" in r.err
    assert vw.cli("jobs", "--json").json() == []


@pytest.mark.libvirt
def test_unreachable_s3_endpoint(vw, guest_factory):
    vw.storage["s3"] = {"type": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:1",
                        "access_key_id": "k", "secret_access_key": "s", "max_attempts": 1,
                        "connect_timeout": 1}
    vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 1}
    g = guest_factory(disks=1, size_mib=16)
    g.write("vda", 0, MiB, pattern=0x42)
    vw.start_worker()
    r = vw.cli("backup", g.name, "--target", "s3", "--wait")
    assert r.code == 5  # EXIT_UNAVAILABLE: the job failed because the storage is unreachable
    assert "http://127.0.0.1:1" in r.err and "unreachable" in r.err
    assert vw.cli("backups", g.name, "--json").json() == []
    assert _our_checkpoints(g.name) == []


@contextmanager
def _tiny_filesystem(path, size: str = "2m"):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0
    need(mounted, "cannot mount a tmpfs here (not root?)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


@pytest.mark.libvirt
def test_full_scratch_directory(vw, guest_factory, s3_settings, tmp_path):
    """Images for S3 are made in scratch space first; a scratch too small is refused."""
    vw.storage["s3"] = s3_storage_entry(s3_settings)
    with _tiny_filesystem(tmp_path / "tiny-scratch") as scratch:
        vw.hosts["local"]["scratch_dir"] = str(scratch)
        g = guest_factory(disks=1, size_mib=32)
        g.write_random("vda", 0, 8 * MiB)
        vw.start_worker()
        r = vw.cli("backup", g.name, "--target", "s3", "--wait")
        assert r.code == 6  # EXIT_STORAGE: NoSpace
        assert f"scratch directory {scratch} has" in r.err and "bytes free" in r.err
        assert [p for p in vw.cli("backups", g.name, "--json").json() if p["status"] == "complete"] == []
        assert _our_checkpoints(g.name) == []
        assert list(scratch.iterdir()) == []


@pytest.mark.libvirt
def test_full_nfs_target(vw, guest_factory, tmp_path):
    """libvirt writes straight onto a mounted target; a target too small is refused and
    left as it was."""
    with _tiny_filesystem(tmp_path / "tiny-share") as share:
        vw.storage["nfs"] = {"type": "nfs", "path": str(share)}
        g = guest_factory(disks=1, size_mib=32)
        g.write_random("vda", 0, 8 * MiB)
        vw.start_worker()
        r = vw.cli("backup", g.name, "--wait")
        assert r.code == 6  # EXIT_STORAGE: NoSpace
        assert "storage 'nfs'" in r.err and "bytes free" in r.err
        assert [p for p in vw.cli("backups", g.name, "--json").json() if p["status"] == "complete"] == []
        assert _our_checkpoints(g.name) == []
        assert [p.name for p in share.rglob("*") if p.is_file()] == []


@pytest.mark.libvirt
def test_restore_refuses_unknown_point_and_occupied_directory(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    g.write("vda", 0, MiB, pattern=0x42)
    vw.start_worker()
    assert vw.cli("backup", g.name, "--wait").code == 0
    r = vw.cli("restore", g.name, "--point", "0000-nope", "--to-dir", str(tmp_path / "x"), "--wait")
    assert r.code == 4 and "no restore point '0000-nope'" in r.err
    r = vw.cli("restore", "other-domain", "--point", "latest", "--to-dir", str(tmp_path / "x"), "--wait")
    assert r.code == 4 and "no complete restore point" in r.err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "vda.qcow2").write_bytes(b"precious")
    r = vw.cli("restore", g.name, "--to-dir", str(occupied), "--wait")
    assert r.code == 1 and "already holds vda.qcow2" in r.err
    assert (occupied / "vda.qcow2").read_bytes() == b"precious"
