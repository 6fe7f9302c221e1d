"""The repository key of a format-2 repository, and the key file that holds it.

A repository key is two random 256-bit secrets: ``encryption`` (AES-256-GCM for every
object) and ``ids`` (the key of the hash that names chunks, so a chunk's name reveals nothing
about its content). The key file holds both, encrypted with a key derived from a
passphrase by scrypt; without the passphrase the key file is useless, and without the
key file the repository is.

The key file is JSON (docs/repository-format.md, "Key file")::

    {"format": "virtwarden-key", "version": 1, "repository": "<uuid>",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<base64>"},
     "nonce": "<base64>", "wrapped": "<base64 of AES-256-GCM(json of the secrets)>"}

The repository id is the associated data of the wrapping, so a key file cannot be passed
off as another repository's.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from virtwarden.errors import ConfigError

FORMAT = "virtwarden-key"
VERSION = 1
# scrypt's cost: 2**17 * 128 * r = 128 MiB of memory and about a third of a second per
# unwrap here, paid once per process and key file: _derive remembers what it derived, so a
# process that opens the repository again (the API, a runbook's steps, a job's planning and
# then its run) does not pay it again.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1


def scrypt_n(memory_mib: int) -> int:
    """scrypt's cost parameter that takes ``memory_mib`` of memory (128 * r bytes per unit)."""
    return memory_mib * 1024 * 1024 // (128 * SCRYPT_R)


class KeyFileError(ConfigError):
    """A key file that is missing, damaged, of another repository, or opened with a
    wrong passphrase: nothing in the repository can be read or written without it."""


@dataclass(frozen=True)
class RepositoryKey:
    repository: str  # the repository's id (a UUID), also written in its config object
    encryption: bytes  # 32 bytes: AES-256-GCM
    ids: bytes  # 32 bytes: the key of the keyed hash (BLAKE3 or HMAC-SHA256) naming chunks

    @classmethod
    def generate(cls) -> RepositoryKey:
        return cls(str(uuid.uuid4()), os.urandom(32), os.urandom(32))

    def __repr__(self) -> str:  # never print the secrets
        return f"RepositoryKey(repository={self.repository!r})"


@functools.lru_cache(maxsize=8)
def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not passphrase:
        raise KeyFileError("the key file's passphrase is empty")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def wrap(key: RepositoryKey, passphrase: str, *, n: int = SCRYPT_N) -> bytes:
    """The key file (bytes of JSON) holding ``key``, opened by ``passphrase``."""
    salt, nonce = os.urandom(16), os.urandom(12)
    secret = json.dumps({"encryption": _b64(key.encryption), "ids": _b64(key.ids)}).encode()
    sealed = AESGCM(_derive(passphrase, salt, n, SCRYPT_R, SCRYPT_P)).encrypt(nonce, secret, key.repository.encode())
    doc = {"format": FORMAT, "version": VERSION, "repository": key.repository,
           "kdf": {"name": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
           "nonce": _b64(nonce), "wrapped": _b64(sealed)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def unwrap(keyfile: bytes, passphrase: str, *, source: str = "the key file") -> RepositoryKey:
    """The repository key in ``keyfile``; KeyFileError naming ``source`` when the file is
    not a key file or the passphrase does not open it."""
    try:
        doc = json.loads(keyfile)
        if doc.get("format") != FORMAT:
            raise KeyFileError(f"{source} is not a virtwarden key file")
        if doc.get("version") != VERSION:
            raise KeyFileError(f"{source} is a key file of version {doc.get('version')}; this virtwarden "
                               f"reads version {VERSION}")
        kdf = doc["kdf"]
        if kdf.get("name") != "scrypt":
            raise KeyFileError(f"{source}: unknown key derivation {kdf.get('name')!r}")
        wrapping = _derive(passphrase, _unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        repository = str(doc["repository"])
        nonce, sealed = _unb64(doc["nonce"]), _unb64(doc["wrapped"])
    except (ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{source} is damaged: {e}") from e
    try:
        secret = json.loads(AESGCM(wrapping).decrypt(nonce, sealed, repository.encode()))
    except InvalidTag:
        raise KeyFileError(f"the passphrase does not open {source} (wrong passphrase, or the file was "
                           f"changed)") from None
    key = RepositoryKey(repository, _unb64(secret["encryption"]), _unb64(secret["ids"]))
    if len(key.encryption) != 32 or len(key.ids) != 32:
        raise KeyFileError(f"{source} holds keys of the wrong length")
    return key


def rewrap(keyfile: bytes, old: str, new: str, *, source: str = "the key file") -> bytes:
    """The same key under a new passphrase (``virtwarden key passwd``)."""
    key = unwrap(keyfile, old, source=source)
    n = int(json.loads(keyfile)["kdf"]["n"])
    return wrap(key, new, n=n)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
