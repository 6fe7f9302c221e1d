"""Objects of a format-2 repository: how a chunk, an index or a manifest is turned into
the bytes a storage backend keeps, and back.

Every object is compressed (zstd, kept raw when that does not make it smaller), then
encrypted and authenticated (AES-256-GCM) with the repository key::

    magic "VWR2" | version 1 | mode | nonce (12 bytes, mode 1 only) | body

- mode 1 (encrypted): body = AES-256-GCM(payload), its 16-byte tag at the end.
- mode 0 (a repository whose configuration says ``encryption: none``): body = payload
  followed by SHA-256 of the header, the name and the payload (damage is found; a
  deliberate change is not, which is what encryption is for).

payload = compression (1 byte: 0 raw, 1 zstd) | data. The compression byte is inside
the encryption: the storage operator cannot tell which chunks compressed.

The associated data of the encryption is the header followed by the object's kind and
name (``chunk`` and its id, ``index`` and its key...): an object moved to another name
or kind no longer opens. A chunk's id is a keyed hash of its plaintext with the key's
``ids`` secret, by the function the repository's config names (``chunk_ids``): keyed
BLAKE3 in repositories created since 2026-12-08, HMAC-SHA256 before (unkeyed BLAKE3 or
SHA-256 without encryption). Opening a chunk computes its id again
unless the caller says not to: the tag (or the digest) already binds the content to
the id it was sealed under, so what the id check adds is a check on the writer that
sealed it (its plaintext hashed to that id); verify makes it, a restore's read does not
(computing HMAC-SHA256 halved how fast a chunk opens).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from virtwarden.storage_backends.format2.keys import RepositoryKey

from virtwarden.errors import ChecksumMismatch

MAGIC = b"VWR2"
VERSION = 1
# The config of a repository that records how its chunks are named ("chunk_ids") is
# sealed as version 2, the same layout: a virtwarden from before 2026-12-08 reads version
# 1 only, so it refuses such a repository ("object version 2") instead of writing chunks
# named by HMAC-SHA256 into one whose chunks are named by BLAKE3 (a fleet upgraded host
# by host).
CONFIG_VERSION = 2
PLAIN, AES_GCM = 0, 1
RAW, ZSTD = 0, 1
NONCE = 12
TAG = 16
DIGEST = 32
HEADER = len(MAGIC) + 2
ZSTD_LEVEL = 3  # see docs/repository-format.md, "Compression": level 3 keeps up with the disks here
# Before compressing an object larger than SAMPLES * SAMPLE bytes, that many pieces spread
# over it are compressed at level 1; unless they shrink below SAMPLE_RATIO of their size,
# the object is stored raw (docs/repository-format.md, "Objects").
SAMPLES, SAMPLE, SAMPLE_RATIO = 8, 4096, 0.98
# How chunks are named (a repository's config, "chunk_ids"). BLAKE3 keyed with the ids
# secret ran 5.4x faster than HMAC-SHA256 on one core here (7.9 against 1.46 GB/s,
# docs/benchmarks.md): every byte of every backup is hashed. A config without the field
# is of a repository created before, whose chunks are named by HMAC-SHA256.
BLAKE3, HMAC_SHA256 = "blake3", "hmac-sha256"
CHUNK_IDS = (BLAKE3, HMAC_SHA256)


class DamagedObject(ChecksumMismatch):
    """A stored object that does not open: changed, cut short, written under another name
    or with another key."""


class Codec:
    """Seals and opens objects with one repository key (``None``: no encryption)."""

    def __init__(self, key: RepositoryKey | None, *, level: int = ZSTD_LEVEL, sampling: bool = True,
                 ids: str = BLAKE3) -> None:
        if ids not in CHUNK_IDS:
            raise ValueError(f"chunk ids {ids!r}: this virtwarden names chunks by {', '.join(CHUNK_IDS)}")
        self.key = key
        self.ids = ids  # Format2Repository sets its config's once it has read it
        self.level = level
        self.sampling = sampling  # False: every object is compressed whole (bench.compression compares)
        self._aead = AESGCM(key.encryption) if key else None
        self._local = threading.local()  # zstd contexts are not shared between threads

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def chunk_id(self, data: bytes | bytearray) -> str:
        """The id of a chunk holding ``data``: keyed, so it says nothing of ``data``."""
        if self.ids == BLAKE3:
            if self.key is None:
                return blake3.blake3(data).hexdigest()
            return blake3.blake3(data, key=self.key.ids).hexdigest()
        if self.key is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self.key.ids, data, hashlib.sha256).hexdigest()

    def seal(self, kind: str, name: str, data: bytes | bytearray, *, compress: bool = True,
             version: int = VERSION) -> bytes | bytearray:
        compress = compress and self._worth_compressing(data)
        packed = self._compressor().compress(data) if compress else data
        payload = (bytes([ZSTD]) + packed) if compress and len(packed) < len(data) else (bytes([RAW]) + data)
        if self._aead is None:
            header = MAGIC + bytes([version, PLAIN])
            return header + payload + _digest(header, kind, name, payload)
        nonce = os.urandom(NONCE)
        header = MAGIC + bytes([version, AES_GCM]) + nonce
        encrypt_into = getattr(self._aead, "encrypt_into", None)  # cryptography 45 and later
        if encrypt_into is None:
            return header + self._aead.encrypt(nonce, payload, _associated(header, kind, name))
        # Sealed straight after the header: a chunk's bytes are not copied once more.
        out = bytearray(len(header) + len(payload) + TAG)
        out[:len(header)] = header
        encrypt_into(nonce, payload, _associated(header, kind, name), memoryview(out)[len(header):])
        return out

    def open(self, kind: str, name: str, blob: bytes, *, check_id: bool = True) -> bytes:
        """The data sealed in ``blob``; DamagedObject saying what is wrong with it.
        ``check_id``: a chunk's id is computed again and compared with ``name``."""
        what = f"{kind} {name}"
        if len(blob) < HEADER or blob[:len(MAGIC)] != MAGIC:
            raise DamagedObject(f"{what}: not a format-2 object")
        version, mode = blob[len(MAGIC)], blob[len(MAGIC) + 1]
        if version != VERSION and not (kind == "config" and version == CONFIG_VERSION):
            raise DamagedObject(f"{what}: object version {version}, this virtwarden reads {VERSION}")
        if mode == AES_GCM:
            if self._aead is None:
                raise DamagedObject(f"{what}: encrypted, and this repository is configured without encryption")
            if len(blob) < HEADER + NONCE + TAG:
                raise DamagedObject(f"{what}: cut short ({len(blob)} bytes)")
            header = blob[:HEADER + NONCE]
            try:
                payload = self._aead.decrypt(header[HEADER:], blob[HEADER + NONCE:], _associated(header, kind, name))
            except InvalidTag:
                raise DamagedObject(f"{what}: authentication failed (changed, moved, or not written with "
                                    f"this repository's key)") from None
        elif mode == PLAIN:
            if self._aead is not None:
                raise DamagedObject(f"{what}: not encrypted, in a repository that is")
            header, payload, digest = blob[:HEADER], blob[HEADER:-DIGEST], blob[-DIGEST:]
            if len(blob) < HEADER + 1 + DIGEST or not hmac.compare_digest(digest, _digest(header, kind, name,
                                                                                          payload)):
                raise DamagedObject(f"{what}: checksum mismatch (changed or cut short)")
        else:
            raise DamagedObject(f"{what}: unknown mode {mode}")
        data = self._unpack(what, payload)
        if kind == "chunk" and check_id and not hmac.compare_digest(self.chunk_id(data), name):
            raise DamagedObject(f"{what}: its content does not have its id")
        return data

    def _unpack(self, what: str, payload: bytes) -> bytes:
        if not payload:
            raise DamagedObject(f"{what}: empty payload")
        if payload[0] == RAW:
            return payload[1:]
        if payload[0] == ZSTD:
            try:
                return self._decompressor().decompress(payload[1:])
            except zstandard.ZstdError as e:
                raise DamagedObject(f"{what}: does not decompress: {e}") from e
        raise DamagedObject(f"{what}: unknown compression {payload[0]}")

    def _worth_compressing(self, data: bytes | bytearray) -> bool:
        """Whether compressing ``data`` may make it smaller, judged from samples spread
        over it (``SAMPLES`` pieces of ``SAMPLE`` bytes, compressed at zstd's fastest
        level): data that does not compress at all (random, encrypted or already
        compressed) is stored raw without paying for a whole attempt. Objects of up to
        ``SAMPLES * SAMPLE`` bytes are always tried."""
        n = len(data)
        if not self.sampling or n <= SAMPLES * SAMPLE:
            return True
        view, step = memoryview(data), n // SAMPLES
        sample = b"".join(view[i * step:i * step + SAMPLE] for i in range(SAMPLES))
        s = getattr(self._local, "sampler", None)
        if s is None:
            s = self._local.sampler = zstandard.ZstdCompressor(level=1, write_content_size=False)
        return len(s.compress(sample)) < len(sample) * SAMPLE_RATIO

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "compressor", None)
        if c is None:
            c = self._local.compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "decompressor", None)
        if d is None:
            d = self._local.decompressor = zstandard.ZstdDecompressor()
        return d


def _associated(header: bytes, kind: str, name: str) -> bytes:
    return header + kind.encode() + b"\0" + name.encode()


def _digest(header: bytes, kind: str, name: str, payload: bytes) -> bytes:
    h = hashlib.sha256(_associated(header, kind, name))
    h.update(payload)
    return h.digest()
