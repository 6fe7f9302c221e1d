"""``virtwarden key``: the key of a format-2 repository, through the command line, on a
real directory and on the S3 endpoint. A refused command leaves nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from virtwarden.storage_backends.format2.access import open_repository
from virtwarden.storage_backends.format2.repository import CONFIG_KEY

from tests.harness import FAST_KDF, add_format2_target

pytestmark = [pytest.mark.cli_in_process]


@pytest.fixture(params=["nfs", "s3"])
def vault(request, vw, tmp_path: Path):
    """A format-2 target ``vault`` of the installation, its key file not made yet."""
    add_format2_target(vw, "vault", request.param, request, tmp_path)
    return vw


def _target(vw, name: str = "vault"):
    from virtwarden import config

    return config.load(str(vw.write_config()), env={}).storage_target(name)


def test_init_makes_a_private_key_file_and_a_repository_that_opens_with_it(vault) -> None:
    r = vault.cli("key", "init", "vault", "--json")
    assert r.code == 0, r.err
    said = r.json()
    key_file = Path(said["key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (said["encryption"], said["chunk_size"], said["chunk_ids"]) == ("aes-256-gcm", 512 * 1024, "blake3")
    repo = open_repository("vault", _target(vault))
    assert repo.config["repository"] == said["repository"] == json.loads(key_file.read_bytes())["repository"]
    assert json.loads(key_file.read_bytes())["kdf"]["n"] == 2**17  # 128 MiB unless asked otherwise

    before = key_file.read_bytes()
    again = vault.cli("key", "init", "vault")
    assert again.code == 6 and "already holds a format-2 repository" in again.err
    assert key_file.read_bytes() == before
    key_file.unlink()  # a lost key file is not recreated over the repository either
    again = vault.cli("key", "init", "vault")
    assert again.code == 6 and not key_file.exists()


def test_a_wrong_or_missing_passphrase_or_key_file_is_a_clear_error(vault, tmp_path: Path) -> None:
    assert vault.cli("key", "init", "vault", *FAST_KDF).code == 0
    target = _target(vault)
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong horse\n")
    r = vault.cli("key", "passwd", "vault", "--passphrase-file", str(wrong), "--new-passphrase-file", str(wrong))
    assert r.code == 3 and f"the passphrase does not open key file {target.key_file}" in r.err
    Path(target.key_file).rename(tmp_path / "moved.key")
    with pytest.raises(Exception, match="does not exist .*virtwarden key init vault, or install a copy"):
        open_repository("vault", target)


def test_export_then_import_installs_the_same_key_and_refuses_another_repositorys(vault, tmp_path: Path) -> None:
    assert vault.cli("key", "init", "vault", *FAST_KDF).code == 0
    target = _target(vault)
    exported = vault.cli("key", "export", "vault")
    assert exported.code == 0 and exported.out.encode() == Path(target.key_file).read_bytes()
    copy = tmp_path / "copy.key"
    assert vault.cli("key", "export", "vault", "--to", str(copy)).code == 0
    assert copy.stat().st_mode & 0o777 == 0o600
    assert vault.cli("key", "export", "vault", "--to", str(copy)).code == 3  # never over a file

    Path(target.key_file).unlink()  # the host lost it: the copy brings it back
    r = vault.cli("key", "import", "vault", str(copy))
    assert r.code == 0, r.err
    assert open_repository("vault", target).config["repository"] == json.loads(copy.read_bytes())["repository"]

    # another repository's key: refused, the installed key stays
    vault.storage["other"] = {"type": "nfs", "path": str(tmp_path / "other"), "create": True, "format": 2,
                              "key_file": str(tmp_path / "other.key"), "passphrase_file": target.passphrase_file}
    assert vault.cli("key", "init", "other", *FAST_KDF).code == 0
    before = Path(target.key_file).read_bytes()
    Path(target.key_file).unlink()
    r = vault.cli("key", "import", "vault", str(tmp_path / "other.key"))
    assert r.code == 3 and "other.key is not the key of the repository in storage vault" in r.err
    assert not Path(target.key_file).exists()
    Path(target.key_file).write_bytes(before)


def test_passwd_locks_the_same_key_with_the_new_passphrase_only(vault, tmp_path: Path) -> None:
    assert vault.cli("key", "init", "vault", *FAST_KDF).code == 0
    target = _target(vault)
    repository = open_repository("vault", target).config["repository"]
    new = tmp_path / "new"
    new.write_text("new passphrase\n")
    r = vault.cli("key", "passwd", "vault", "--new-passphrase-file", str(new))
    assert r.code == 0, r.err
    assert json.loads(Path(target.key_file).read_bytes())["kdf"]["n"] == 2**14  # the cost it was made with
    assert Path(target.key_file).stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception, match="the passphrase does not open"):
        open_repository("vault", target)
    moved = target.model_copy(update={"passphrase_file": str(new)})
    assert open_repository("vault", moved).config["repository"] == repository


def test_a_repository_without_encryption_is_made_only_when_configured(vw, tmp_path: Path) -> None:
    vw.storage["plain"] = {"type": "nfs", "path": str(tmp_path / "plain"), "create": True, "format": 2,
                           "encryption": "none"}
    r = vw.cli("key", "init", "plain", "--json")
    assert r.code == 0, r.err
    assert (r.json()["encryption"], r.json()["key_file"]) == ("none", None)
    assert open_repository("plain", _target(vw, "plain")).codec.encrypted is False

    vw.storage["nokey"] = {"type": "nfs", "path": str(tmp_path / "nokey"), "create": True, "format": 2}
    r = vw.cli("key", "init", "plain")
    assert r.code == 3 and "format 2 with encryption needs key_file" in r.err  # the whole file is refused
    del vw.storage["nokey"]
    r = vw.cli("key", "init", "nfs")
    assert r.code == 3 and "storage nfs is a format-1 target" in r.err
    assert not (Path(vw.storage["nfs"]["path"]) / CONFIG_KEY).exists()
