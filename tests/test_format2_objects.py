"""Format-2 objects, indexes and key files: what the storage operator sees, what a
changed byte does, what a wrong key or passphrase says. Pure functions: no services."""
from __future__ import annotations

import json
import os

import pytest
from virtwarden.storage_backends.format2 import keys, objects
from virtwarden.storage_backends.format2.index import DiskIndex
from virtwarden.storage_backends.format2.objects import Codec, DamagedObject

MiB = 1024 * 1024
FAST_N = 2**10  # scrypt's cost in tests: the real one takes half a second per unwrap


@pytest.fixture(scope="module")
def key() -> keys.RepositoryKey:
    return keys.RepositoryKey.generate()


def test_a_sealed_chunk_opens_to_its_data_and_reveals_none_of_it(key) -> None:
    codec = Codec(key)
    data = b"virtwarden-secret-marker " * 40_000  # compressible, ~1 MiB
    cid = codec.chunk_id(data)
    blob = codec.seal("chunk", cid, data)
    assert codec.open("chunk", cid, blob) == data
    assert b"virtwarden-secret-marker" not in blob
    assert len(blob) < len(data) // 10  # compressed before it was encrypted


def test_a_chunk_id_is_keyed(key) -> None:
    """The same data under two repository keys has two unrelated ids, by either function
    a repository names its chunks with (keyed BLAKE3, HMAC-SHA256 in repositories created
    before it); without a key the id is the function's plain hash (an unencrypted
    repository)."""
    import hashlib
    import hmac

    import blake3

    data = os.urandom(4096)
    other = Codec(keys.RepositoryKey.generate())
    assert Codec(key).chunk_id(data) != other.chunk_id(data)
    assert Codec(key).chunk_id(data) == blake3.blake3(data, key=key.ids).hexdigest()
    assert Codec(key, ids=objects.HMAC_SHA256).chunk_id(data) == hmac.new(key.ids, data, hashlib.sha256).hexdigest()
    assert Codec(None).chunk_id(data) == blake3.blake3(data).hexdigest()
    assert Codec(None, ids=objects.HMAC_SHA256).chunk_id(data) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="chunk ids 'md5': this virtwarden names chunks by blake3, hmac-sha256"):
        Codec(key, ids="md5")


def test_only_a_config_may_be_sealed_as_version_2(key) -> None:
    """Version 2 marks the config of a repository that records how its chunks are named
    (code reading version 1 only refuses it); any other object of version 2 is refused."""
    codec = Codec(key)
    config = codec.seal("config", "format2/config", b"{}", version=objects.CONFIG_VERSION)
    assert codec.open("config", "format2/config", config) == b"{}"
    index = codec.seal("index", "points/a/b/index.vda", b"{}", version=objects.CONFIG_VERSION)
    with pytest.raises(DamagedObject, match="object version 2, this virtwarden reads 1"):
        codec.open("index", "points/a/b/index.vda", index)


def test_incompressible_data_is_stored_raw(key) -> None:
    codec = Codec(key)
    data = os.urandom(MiB)
    blob = codec.seal("chunk", codec.chunk_id(data), data)
    assert len(blob) == len(data) + 1 + objects.HEADER + objects.NONCE + objects.TAG


def _compressed(codec: Codec, data: bytes) -> bool:
    return len(codec.seal("chunk", codec.chunk_id(data), data)) < len(data)


def test_whether_a_chunk_is_compressed_is_judged_from_samples_spread_over_it(key) -> None:
    """Random data is stored raw without a whole attempt; a chunk compresses when any
    part of it the samples land in does: zeros in one half, text, a repeated pattern."""
    codec = Codec(key)
    half = 256 * 1024
    assert not _compressed(codec, os.urandom(2 * half))
    assert _compressed(codec, os.urandom(half) + bytes(half))
    assert _compressed(codec, bytes(half) + os.urandom(half))
    assert _compressed(codec, (b"virtwarden " * 50_000)[:2 * half])
    assert _compressed(codec, os.urandom(4096) * 128)
    # Small objects (indexes, manifests) are always tried: the samples would be all of them.
    small = b"x" * (objects.SAMPLES * objects.SAMPLE)
    assert _compressed(codec, small)
    # What the samples do not see is not compressed: random where all eight land.
    mixed = bytearray(os.urandom(2 * half))
    step = len(mixed) // objects.SAMPLES
    for i in range(objects.SAMPLES):
        mixed[i * step + objects.SAMPLE:(i + 1) * step] = bytes(step - objects.SAMPLE)
    assert not _compressed(codec, bytes(mixed))


@pytest.mark.parametrize("where", [0, 5, 10, 100, -1])
def test_any_changed_byte_is_found(key, where: int) -> None:
    codec = Codec(key)
    data = os.urandom(4096)
    cid = codec.chunk_id(data)
    blob = bytearray(codec.seal("chunk", cid, data))
    blob[where] ^= 0x01
    with pytest.raises(DamagedObject, match=f"chunk {cid}"):
        codec.open("chunk", cid, bytes(blob))


def test_an_object_moved_to_another_name_or_kind_does_not_open(key) -> None:
    codec = Codec(key)
    a, b = os.urandom(100), os.urandom(100)
    blob = codec.seal("chunk", codec.chunk_id(a), a)
    with pytest.raises(DamagedObject, match="authentication failed"):
        codec.open("chunk", codec.chunk_id(b), blob)
    with pytest.raises(DamagedObject, match="authentication failed"):
        codec.open("index", codec.chunk_id(a), blob)


def test_a_cut_short_or_foreign_object_is_damaged_not_a_crash(key) -> None:
    codec = Codec(key)
    data = os.urandom(100)
    cid = codec.chunk_id(data)
    blob = codec.seal("chunk", cid, data)
    for bad, why in ((blob[:20], "cut short"), (b"", "not a format-2 object"), (b"QFI\xfb" + blob[4:], "not a format")):
        with pytest.raises(DamagedObject, match=why):
            codec.open("chunk", cid, bad)


def test_another_repositorys_key_is_refused(key) -> None:
    data = os.urandom(100)
    blob = Codec(key).seal("manifest", "points/p1", data)
    with pytest.raises(DamagedObject, match="not written with this repository's key"):
        Codec(keys.RepositoryKey.generate()).open("manifest", "points/p1", blob)


def test_an_unencrypted_repository_finds_damage_and_refuses_encrypted_objects(key) -> None:
    plain = Codec(None)
    data = b"plain text " * 100
    cid = plain.chunk_id(data)
    blob = plain.seal("chunk", cid, data)
    assert plain.open("chunk", cid, blob) == data
    changed = bytearray(blob)
    changed[8] ^= 0xFF
    with pytest.raises(DamagedObject, match="checksum mismatch"):
        plain.open("chunk", cid, bytes(changed))
    with pytest.raises(DamagedObject, match="configured without encryption"):
        plain.open("chunk", cid, Codec(key).seal("chunk", cid, data))
    with pytest.raises(DamagedObject, match="not encrypted, in a repository that is"):
        Codec(key).open("chunk", cid, blob)


def test_a_chunk_whose_content_is_not_its_id_is_damaged(key) -> None:
    """Sealed under the wrong id by a buggy or hostile writer with the key: the id is
    checked again after opening."""
    codec = Codec(key)
    blob = codec.seal("chunk", "00" * 32, b"not what the id says")
    with pytest.raises(DamagedObject, match="does not have its id"):
        codec.open("chunk", "00" * 32, blob)
    # A restore's read trusts the tag for that (it binds the content to the id it was
    # sealed under): only verify finds such a writer's chunk.
    assert codec.open("chunk", "00" * 32, blob, check_id=False) == b"not what the id says"


@pytest.mark.parametrize("encrypted", [True, False])
def test_without_the_id_check_a_chunk_still_opens_only_under_its_own_id(key, encrypted) -> None:
    codec = Codec(key if encrypted else None)
    a, b = os.urandom(1000), os.urandom(1000)
    blob = codec.seal("chunk", codec.chunk_id(a), a)
    assert codec.open("chunk", codec.chunk_id(a), blob, check_id=False) == a
    with pytest.raises(DamagedObject, match="authentication failed" if encrypted else "checksum mismatch"):
        codec.open("chunk", codec.chunk_id(b), blob, check_id=False)  # moved to another chunk's name
    changed = bytearray(blob)
    changed[-40] ^= 1
    with pytest.raises(DamagedObject, match="authentication failed" if encrypted else "checksum mismatch"):
        codec.open("chunk", codec.chunk_id(a), bytes(changed), check_id=False)


# --- indexes ---------------------------------------------------------------------------------
def test_an_index_round_trips_with_zero_pieces_and_a_short_tail() -> None:
    ids = ("ab" * 32, None, "cd" * 32)
    index = DiskIndex("vda", 2 * 4 * MiB + 512, 4 * MiB, ids)
    again = DiskIndex.decode(index.encode())
    assert again == index
    assert list(again.pieces()) == [(0, 4 * MiB, "ab" * 32), (4 * MiB, 4 * MiB, None), (8 * MiB, 512, "cd" * 32)]
    assert again.referenced() == {"ab" * 32, "cd" * 32}


def test_an_index_that_does_not_cover_its_disk_is_refused() -> None:
    with pytest.raises(ValueError, match="2 chunks for"):
        DiskIndex("vda", 3 * MiB, MiB, ("ab" * 32, None))
    good = DiskIndex("vda", 2 * MiB, MiB, ("ab" * 32, None)).encode()
    with pytest.raises(DamagedObject, match="not a disk index"):
        DiskIndex.decode(good[:-1])


# --- key files -------------------------------------------------------------------------------
def test_a_key_file_opens_with_its_passphrase_only(key) -> None:
    keyfile = keys.wrap(key, "correct horse", n=FAST_N)
    assert keys.unwrap(keyfile, "correct horse") == key
    assert key.encryption.hex() not in keyfile.decode() and key.ids.hex() not in keyfile.decode()
    with pytest.raises(keys.KeyFileError, match="the passphrase does not open /etc/vw/key"):
        keys.unwrap(keyfile, "wrong horse", source="/etc/vw/key")


def test_a_new_passphrase_keeps_the_key(key) -> None:
    keyfile = keys.rewrap(keys.wrap(key, "old", n=FAST_N), "old", "new")
    assert keys.unwrap(keyfile, "new") == key
    with pytest.raises(keys.KeyFileError):
        keys.unwrap(keyfile, "old")


def test_a_key_file_passed_off_as_another_repositorys_is_refused(key) -> None:
    doc = json.loads(keys.wrap(key, "pw", n=FAST_N))
    doc["repository"] = keys.RepositoryKey.generate().repository
    with pytest.raises(keys.KeyFileError, match="does not open"):
        keys.unwrap(json.dumps(doc).encode(), "pw")


@pytest.mark.parametrize("text, why", [
    (b"not json", "is damaged"),
    (b'{"format": "something-else"}', "is not a virtwarden key file"),
    (b'{"format": "virtwarden-key", "version": 9}', "version 9"),
    (b'{"format": "virtwarden-key", "version": 1}', "is damaged"),
])
def test_what_is_not_a_key_file_says_so(text: bytes, why: str) -> None:
    with pytest.raises(keys.KeyFileError, match=why):
        keys.unwrap(text, "pw", source="k")


def test_an_empty_passphrase_is_refused(key) -> None:
    with pytest.raises(keys.KeyFileError, match="empty"):
        keys.wrap(key, "")


def test_the_key_never_prints_its_secrets(key) -> None:
    assert key.encryption.hex() not in repr(key) and key.ids.hex() not in str(key)
