"""Opening a configured format-2 storage target: its key file, the passphrase that opens
it, and the repository.

The passphrase comes from the target's ``passphrase_file`` (its first line), else from
$VIRTWARDEN_KEY_PASSPHRASE, else, for a command run on a terminal, from a prompt. A
daemon never prompts: without a passphrase it fails, saying where to put one.
"""
from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

from virtwarden.storage_backends import open_backend
from virtwarden.storage_backends.base import Backend
from virtwarden.storage_backends.format2 import keys
from virtwarden.storage_backends.format2.keys import KeyFileError, RepositoryKey
from virtwarden.storage_backends.format2.objects import Codec
from virtwarden.storage_backends.format2.repository import Format2Repository

from virtwarden.errors import ConfigError

ENV_PASSPHRASE = "VIRTWARDEN_KEY_PASSPHRASE"


def require_format2(name: str, settings) -> None:
    if settings.format != 2:
        raise ConfigError(f"storage {name} is a format-1 target (set format: 2 and key_file in its configuration)")


def passphrase(name: str, settings, *, prompt: bool = False, confirm: bool = False, file: str | None = None) -> str:
    """The passphrase for storage ``name``'s key file (``file`` overrides the target's
    ``passphrase_file``)."""
    path = file or settings.passphrase_file
    if path:
        try:
            text = Path(path).read_text().splitlines()
        except OSError as e:
            raise KeyFileError(f"storage {name}: cannot read passphrase file {path}: {e.strerror}") from e
        if not text or not text[0]:
            raise KeyFileError(f"storage {name}: passphrase file {path} is empty")
        return text[0]
    if os.environ.get(ENV_PASSPHRASE):
        return os.environ[ENV_PASSPHRASE]
    if prompt and sys.stdin.isatty():
        first = getpass.getpass(f"passphrase for the key of storage {name}: ")
        if confirm and getpass.getpass("again: ") != first:
            raise KeyFileError("the two passphrases differ")
        return first
    raise KeyFileError(f"storage {name}: no passphrase for its key file (set passphrase_file in its configuration, "
                       f"or ${ENV_PASSPHRASE})")


def key_path(name: str, settings) -> Path:
    if not settings.key_file:
        raise ConfigError(f"storage {name} has no key_file in its configuration")
    return Path(settings.key_file)


def load_key(name: str, settings, *, prompt: bool = False) -> RepositoryKey | None:
    """The repository key of storage ``name``; None for a target without encryption."""
    require_format2(name, settings)
    if settings.encryption == "none":
        return None
    path = key_path(name, settings)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"storage {name}: key file {path} does not exist (create it with: virtwarden key init "
                           f"{name}, or install a copy with: virtwarden key import {name} FILE)") from None
    except OSError as e:
        raise KeyFileError(f"storage {name}: cannot read key file {path}: {e.strerror}") from e
    return keys.unwrap(data, passphrase(name, settings, prompt=prompt), source=f"key file {path} of storage {name}")


def open_repository(name: str, settings, *, backend: Backend | None = None,
                    prompt: bool = False) -> Format2Repository:
    return Format2Repository(backend or open_backend(name, settings), Codec(load_key(name, settings, prompt=prompt)))


def repository_of(name: str, settings) -> Format2Repository | None:
    """Storage ``name``'s format-2 repository (its key loaded), or None for a format-1
    target: what a job is given to tell the two apart."""
    return open_repository(name, settings) if settings.format == 2 else None


def repositories(cfg) -> Callable[[str], Format2Repository | None]:
    """Storage name -> ``repository_of`` it, for a configuration (what jobs get as
    ``JobContext.repository``)."""
    return lambda name: repository_of(name, cfg.storage_target(name))
