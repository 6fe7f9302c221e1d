"""``virtwarden key init|export|import|passwd STORAGE``: the key of a format-2 repository.

- ``init`` creates a repository key, writes its key file (0600, never over an existing
  one) and the repository's config object; nothing is left when either fails.
- ``export`` prints the key file (still locked by its passphrase), to keep a copy away
  from the repository: without it and its passphrase nothing in the repository can be read.
- ``import FILE`` installs a copy as the target's key file, once the passphrase opens it
  and it is the key of the repository the storage holds.
- ``passwd`` locks the same key with a new passphrase (the repository is not touched).

Passphrases: ``--passphrase-file``, else the target's ``passphrase_file``, else
$VIRTWARDEN_KEY_PASSPHRASE, else a prompt on a terminal (storage_backends/format2/access.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from virtwarden.cli.output import emit_json, load_config
from virtwarden.errors import EXIT_OK, ConfigError, StorageError
from virtwarden.storage_backends import open_backend
from virtwarden.storage_backends.format2 import keys
from virtwarden.storage_backends.format2.access import key_path, passphrase, require_format2
from virtwarden.storage_backends.format2.keys import KeyFileError, RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.repository import (
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    Format2Repository,
    NotAFormat2Repository,
)
from virtwarden.tasks.restore import fsync_dir


def init(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    settings = cfg.storage_target(args.storage)
    require_format2(args.storage, settings)
    chunk_size = (args.chunk_size_kib or DEFAULT_CHUNK_SIZE // 1024) * 1024
    backend = open_backend(args.storage, settings)
    backend.check()
    if backend.exists(CONFIG_KEY):
        raise StorageError(f"storage {args.storage} already holds a format-2 repository: install its key with "
                           f"virtwarden key import {args.storage} FILE")
    if settings.encryption == "none":
        repo = Format2Repository.init(backend, Codec(None), chunk_size=chunk_size)
        return _said(args, repo, None, "without encryption (as configured): the storage operator can read it")
    path = key_path(args.storage, settings)
    if path.exists():
        raise KeyFileError(f"storage {args.storage}: key file {path} exists; it is never overwritten")
    secret = passphrase(args.storage, settings, prompt=True, confirm=True, file=args.passphrase_file)
    key = RepositoryKey.generate()
    _write_new(path, keys.wrap(key, secret, n=keys.scrypt_n(args.kdf_memory_mib)))
    try:
        repo = Format2Repository.init(backend, Codec(key), chunk_size=chunk_size)
    except BaseException:
        path.unlink(missing_ok=True)  # no key file of a repository that does not exist
        raise
    return _said(args, repo, path, "AES-256-GCM")


def _said(args: argparse.Namespace, repo: Format2Repository, path: Path | None, how: str) -> int:
    cfg = repo.config
    if args.json:
        emit_json({"storage": args.storage, "repository": cfg["repository"], "chunk_size": cfg["chunk_size"],
                   "chunk_ids": repo.chunk_ids, "encryption": cfg["encryption"],
                   "key_file": str(path) if path else None})
        return EXIT_OK
    print(f"storage {args.storage}: format-2 repository {cfg['repository']} created ({how}, chunks of "
          f"{cfg['chunk_size'] // 1024} KiB named by {repo.chunk_ids})")
    if path:
        print(f"key file: {path}. Keep a copy of it and of its passphrase away from this storage "
              f"(virtwarden key export {args.storage}): without both, nothing in it can be read.")
    return EXIT_OK


def _target(args: argparse.Namespace):
    """The format-2 target named on the command line, and its key file's path."""
    settings = load_config(args).storage_target(args.storage)
    require_format2(args.storage, settings)
    return settings, key_path(args.storage, settings)


def _existing(storage: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"storage {storage}: key file {path} does not exist") from None


def export(args: argparse.Namespace) -> int:
    _settings, path = _target(args)
    data = _existing(args.storage, path)
    _check_is_key_file(data, str(path))
    if args.to:
        _write_new(Path(args.to), data)
        print(f"key of storage {args.storage} written to {args.to} (still locked by its passphrase)")
    else:
        sys.stdout.write(data.decode())
    return EXIT_OK


def import_(args: argparse.Namespace) -> int:
    settings, path = _target(args)
    try:
        data = Path(args.file).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {args.file}: {e.strerror}") from e
    key = keys.unwrap(data, passphrase(args.storage, settings, prompt=True, file=args.passphrase_file),
                      source=args.file)
    repo = Format2Repository(open_backend(args.storage, settings), Codec(key))
    try:
        held = repo.config["repository"]
    except NotAFormat2Repository as e:
        raise KeyFileError(f"{args.file} is not the key of the repository in storage {args.storage}: {e}") from e
    if held != key.repository:
        raise KeyFileError(f"{args.file} is the key of repository {key.repository}; storage {args.storage} holds "
                           f"repository {held}")
    if path.exists():
        if path.read_bytes() == data:
            print(f"storage {args.storage}: {path} is this key already")
            return EXIT_OK
        raise KeyFileError(f"storage {args.storage}: key file {path} exists; it is never overwritten (move it "
                           f"away first)")
    _write_new(path, data)
    print(f"storage {args.storage}: key of repository {held} installed as {path}")
    return EXIT_OK


def passwd(args: argparse.Namespace) -> int:
    settings, path = _target(args)
    data = _existing(args.storage, path)
    old = passphrase(args.storage, settings, prompt=True, file=args.passphrase_file)
    if args.new_passphrase_file:
        new = passphrase(args.storage, settings, file=args.new_passphrase_file)
    elif sys.stdin.isatty():
        import getpass

        new = getpass.getpass("new passphrase: ")
        if getpass.getpass("again: ") != new:
            raise KeyFileError("the two passphrases differ")
    else:
        raise ConfigError("the new passphrase: give --new-passphrase-file (or run on a terminal)")
    fresh = keys.rewrap(data, old, new, source=f"key file {path} of storage {args.storage}")
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, fresh)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    print(f"storage {args.storage}: key file {path} now opens with the new passphrase only")
    return EXIT_OK


def _check_is_key_file(data: bytes, source: str) -> None:
    """Refuse to export what is not a key file (without needing its passphrase)."""
    import json

    try:
        ok = json.loads(data).get("format") == keys.FORMAT
    except ValueError:
        ok = False
    if not ok:
        raise KeyFileError(f"{source} is not a virtwarden key file")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, its directory 0700 when made) with ``data``, durably; an
    existing file is an error, never overwritten."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; it is never overwritten") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    fsync_dir(path.parent)
