"""One contract, every backend: the same tests run against NFS (a directory under
tmp_path) and S3 (moto, or the endpoint in $VIRTWARDEN_TEST_S3_ENDPOINT).

Faults (a corrupted object, an interrupted write) are injected
through ``raw``, which reaches the storage directly, bypassing the backend, the way a
disk error or a killed process would.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from virtwarden.storage_backends import _stream, nfs, s3
from virtwarden.storage_backends.base import Backend, ObjectInfo
from virtwarden.storage_backends.nfs import NfsBackend
from virtwarden.storage_backends.s3 import S3Backend

from tests.conftest import need
from tests.faultproxy import Rule, upload_part
from tests.s3server import s3_client
from virtwarden.config import NfsStorage, S3Storage
from virtwarden.errors import (
    ChecksumMismatch,
    InvalidName,
    NoSpace,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)

MIB = 1024 * 1024


class NfsRaw:
    def __init__(self, root: Path) -> None:
        self.root = root

    def corrupt(self, key: str) -> None:
        with open(self.root / key, "r+b") as f:
            head = f.read(16)
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in head))

    def plant_incomplete(self, key: str) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f".tmp-deadbeef-{path.name}").write_bytes(b"half a disk image")

    def incomplete(self, prefix: str = "") -> int:
        return sum(
            1 for p in self.root.rglob(".tmp-*") if str(p.relative_to(self.root)).startswith(prefix)
        )

    def break_reads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def failing(f, size):
            yield f.read(size)
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(_stream, "file_chunks", failing)


class S3Raw:
    def __init__(self, settings: S3Storage) -> None:
        self.client = s3_client(settings.endpoint_url or "")
        self.bucket = settings.bucket
        self.prefix = settings.prefix

    def full(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def corrupt(self, key: str) -> None:
        """Different bytes under the old metadata, as bit rot on the endpoint would."""
        reply = self.client.get_object(Bucket=self.bucket, Key=self.full(key))
        data = bytearray(reply["Body"].read())
        data[:16] = bytes(b ^ 0xFF for b in data[:16])
        self.client.put_object(Bucket=self.bucket, Key=self.full(key), Body=bytes(data), Metadata=reply["Metadata"])

    def plant_incomplete(self, key: str) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.full(key))
        self.client.upload_part(
            Bucket=self.bucket, Key=self.full(key), UploadId=upload["UploadId"], PartNumber=1, Body=b"half"
        )

    def incomplete(self, prefix: str = "") -> int:
        reply = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.full(prefix))
        return len(reply.get("Uploads", []))

    def break_reads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = s3._read_part

        def failing(fd: int, length: int, offset: int) -> bytes:
            if offset >= 5 * MIB:  # any part after the first
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, length, offset)

        monkeypatch.setattr(s3, "_read_part", failing)


@pytest.fixture(params=["nfs", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "nfs":
        root = tmp_path / "repository"
        root.mkdir()
        store: Backend = NfsBackend("test", NfsStorage(type="nfs", path=str(root)))
    else:
        store = S3Backend("test", request.getfixturevalue("s3_settings"))
    yield store
    store.close()


@pytest.fixture
def raw(backend: Backend):
    if isinstance(backend, NfsBackend):
        return NfsRaw(backend.root)
    assert isinstance(backend, S3Backend)
    return S3Raw(backend.settings)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """13 MiB: three 5 MiB parts on S3 (the last one short), four CHUNKs on NFS."""
    path = tmp_path_factory.mktemp("src") / "disk.img"
    path.write_bytes(os.urandom(13 * MIB))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_passes(backend: Backend) -> None:
    backend.check()
    assert list(backend.list()) == []


def test_round_trip_of_a_multipart_file(backend: Backend, big_file: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    stored = backend.put_file("web01/c1/vda.qcow2", big_file, progress=seen.append)
    assert stored.size == big_file.stat().st_size
    assert stored.sha256 == sha(big_file)
    assert seen and seen[-1] == stored.size and seen == sorted(seen)
    assert backend.exists("web01/c1/vda.qcow2")
    assert list(backend.list("web01/")) == [ObjectInfo("web01/c1/vda.qcow2", stored.size)]

    dest = tmp_path / "restore" / "vda.qcow2"
    got = backend.get_file("web01/c1/vda.qcow2", dest, expected_sha256=stored.sha256)
    assert got == stored
    assert sha(dest) == stored.sha256


def test_wrong_expected_checksum_leaves_no_file(backend: Backend, tmp_path: Path) -> None:
    stored = backend.put_bytes("web01/manifest.json", b"{}")
    dest = tmp_path / "out" / "manifest.json"
    with pytest.raises(ChecksumMismatch) as caught:
        backend.get_file("web01/manifest.json", dest, expected_sha256="0" * 64)
    message = str(caught.value)
    assert "web01/manifest.json" in message and "0" * 64 in message and stored.sha256 in message
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_corruption_is_detected(backend: Backend, raw, tmp_path: Path) -> None:
    source = tmp_path / "small.img"
    source.write_bytes(os.urandom(6 * MIB))
    stored = backend.put_file("web01/c1/vdb.qcow2", source)
    raw.corrupt("web01/c1/vdb.qcow2")
    dest = tmp_path / "vdb.qcow2"
    with pytest.raises(ChecksumMismatch):
        backend.get_file("web01/c1/vdb.qcow2", dest, expected_sha256=stored.sha256)
    assert not dest.exists()


def test_interrupted_upload_leaves_nothing(backend: Backend, raw, big_file: Path, monkeypatch) -> None:
    raw.break_reads(monkeypatch)
    with pytest.raises(StorageError, match="Input/output error"):
        backend.put_file("web01/c1/vda.qcow2", big_file)
    assert not backend.exists("web01/c1/vda.qcow2")
    assert list(backend.list()) == []
    assert raw.incomplete() == 0


def test_bytes_round_trip_and_overwrite(backend: Backend) -> None:
    first = backend.put_bytes("web01/manifest.json", b'{"v": 1}')
    assert first.sha256 == hashlib.sha256(b'{"v": 1}').hexdigest() and first.size == 8
    backend.put_bytes("web01/manifest.json", b'{"v": 2}')
    assert backend.get_bytes("web01/manifest.json") == b'{"v": 2}'
    backend.put_bytes("web01/empty", b"")
    assert backend.get_bytes("web01/empty") == b""


def test_list_is_sorted_prefix_limited_and_hides_internals(backend: Backend, raw) -> None:
    for key in ["b/1", "a/2", "a.b", "a/1", "ab/3", "a/x/deep"]:
        backend.put_bytes(key, key.encode())
    raw.plant_incomplete("a/3")
    assert [o.key for o in backend.list()] == ["a.b", "a/1", "a/2", "a/x/deep", "ab/3", "b/1"]
    assert [o.key for o in backend.list("a/")] == ["a/1", "a/2", "a/x/deep"]
    assert [o.key for o in backend.list("a")] == ["a.b", "a/1", "a/2", "a/x/deep", "ab/3"]
    assert [o.key for o in backend.list("a/x")] == ["a/x/deep"]
    assert list(backend.list("zzz/")) == []
    assert next(iter(backend.list("b/"))) == ObjectInfo("b/1", 3)


def test_exists_and_idempotent_delete(backend: Backend) -> None:
    assert not backend.exists("web01/x")
    backend.put_bytes("web01/x", b"1")
    assert backend.exists("web01/x")
    backend.delete("web01/x")
    backend.delete("web01/x")
    backend.delete("never/was")
    assert not backend.exists("web01/x")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "", "a/../b", "a b", "a/"])
def test_invalid_keys_are_refused(backend: Backend, key: str, tmp_path: Path) -> None:
    calls = [
        lambda: backend.put_bytes(key, b"x"),
        lambda: backend.put_file(key, tmp_path),
        lambda: backend.get_bytes(key),
        lambda: backend.get_file(key, tmp_path / "out"),
        lambda: backend.exists(key),
        lambda: backend.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidName):
            call()
    if key:
        with pytest.raises(InvalidName):
            backend.list(key.rstrip("/") + "//")


@pytest.mark.parametrize("key", ["a/.tmp-x", "web01/.tmp-vda.qcow2"])
def test_reserved_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidName, match="reserved"):
        backend.put_bytes(key, b"x")


def test_missing_objects(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="web01/nope"):
        backend.get_bytes("web01/nope")
    dest = tmp_path / "nope"
    with pytest.raises(ObjectNotFound):
        backend.get_file("web01/nope", dest)
    assert not dest.exists()


def test_cleanup_removes_interrupted_writes(backend: Backend, raw) -> None:
    raw.plant_incomplete("web01/c1/vda.qcow2")
    raw.plant_incomplete("web02/c1/vda.qcow2")
    assert list(backend.list()) == []
    assert backend.cleanup_incomplete("web01/") == 1
    assert raw.incomplete("web01/") == 0
    assert raw.incomplete("web02/") == 1
    assert backend.cleanup_incomplete() == 1
    assert raw.incomplete() == 0
    assert backend.cleanup_incomplete() == 0


# --- backend-specific edges -------------------------------------------------------
def test_nfs_delete_removes_the_directories_it_empties_below_the_top(tmp_path: Path) -> None:
    """A pruned point leaves no empty directories behind (its point's, then its chain's),
    but a domain's top-level directory stays for the chains to come."""
    backend = NfsBackend("nas", NfsStorage(type="nfs", path=str(tmp_path)))
    for key in ("dom/chain/p1/vda.qcow2", "dom/chain/p1/manifest.json", "dom/chain/p2/vda.qcow2"):
        backend.put_bytes(key, b"x")
    backend.delete("dom/chain/p1/vda.qcow2")
    assert (tmp_path / "dom/chain/p1").is_dir()
    backend.delete("dom/chain/p1/manifest.json")
    assert not (tmp_path / "dom/chain/p1").exists() and (tmp_path / "dom/chain/p2").is_dir()
    backend.delete("dom/chain/p2/vda.qcow2")
    assert not (tmp_path / "dom/chain").exists() and (tmp_path / "dom").is_dir()


def test_nfs_missing_path_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "not-mounted", tmp_path / "a-file"):
        backend = NfsBackend("nas", NfsStorage(type="nfs", path=str(path)))
        calls = (backend.check, lambda: backend.put_bytes("k", b"x"), lambda: backend.get_bytes("k"),  # noqa: B023
                 lambda: backend.exists("k"), lambda: list(backend.list()))  # noqa: B023 - called in this iteration
        for call in calls:
            with pytest.raises(StorageUnavailable, match=re.escape(f"storage 'nas': path {path} does not exist")):
                call()
    assert not (tmp_path / "not-mounted").exists()  # never created behind an unmounted share


def test_nfs_creates_its_path_only_when_told(tmp_path: Path) -> None:
    path = tmp_path / "local" / "repository"
    backend = NfsBackend("local", NfsStorage(type="nfs", path=str(path), create=True))
    backend.check()
    assert path.is_dir()


@pytest.fixture
def tiny_fs(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    need(os.geteuid() == 0, "mounting a 1 MiB tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    need(done.returncode == 0, f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_nfs_full_filesystem_is_no_space(tiny_fs: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.img"
    source.write_bytes(os.urandom(2 * MIB))
    backend = NfsBackend("nas", NfsStorage(type="nfs", path=str(tiny_fs)))
    no_space = re.escape(f"storage 'nas': no space left writing {tiny_fs}/web01/") + r".* bytes free"
    with pytest.raises(NoSpace, match=no_space):
        backend.put_file("web01/vda.qcow2", source)
    assert [p for p in tiny_fs.rglob("*") if p.is_file()] == []


def test_s3_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    settings = S3Storage(
        type="s3", bucket="backups", endpoint_url="http://127.0.0.1:1", access_key_id="testing",
        secret_access_key="testing", max_attempts=1, connect_timeout=1, read_timeout=1,
    )
    backend = S3Backend("offsite", settings)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"storage 'offsite': S3 endpoint http://127.0.0.1:1 unreachable"):
        backend.check()
    with pytest.raises(StorageUnavailable):
        backend.put_bytes("web01/manifest.json", b"{}")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("reply", "sse", "damaged"), [
    ({"ChecksumSHA256": "SENT", "ETag": '"00000000000000000000000000000000"'}, None, False),  # took the checksum
    ({"ChecksumSHA256": "b3RoZXI=", "ETag": '"x"'}, None, True),  # took it, and says it stored other bytes
    ({"ETag": '"MD5"'}, None, False),  # ignored the checksum: the ETag is the MD5 of what was sent
    ({"ETag": '"00000000000000000000000000000000"'}, None, True),  # ... of other bytes
    ({"ETag": '"00000000000000000000000000000000"'}, "aws:kms", False),  # not an MD5 under SSE-KMS
    ({"ETag": '"3858f62230ac3c915f300c664312c63f-2"'}, None, False),  # a multipart ETag: not compared
])
def test_s3_a_puts_answer_shows_whether_the_endpoint_stored_what_was_sent(reply, sse, damaged) -> None:
    """The check of a PutObject's answer (put_bytes sends again, then removes, what it
    finds damaged; the proxy test in test_storage_faults.py does that end to end)."""
    data = b"a chunk"
    sent = base64.b64encode(hashlib.sha256(data).digest()).decode()
    reply = {k: v.replace("SENT", sent).replace("MD5", hashlib.md5(data).hexdigest()) for k, v in reply.items()}
    backend = S3Backend("offsite", S3Storage(type="s3", bucket="backups", sse=sse))
    if damaged:
        with pytest.raises(s3._StoredDamaged, match="s3://backups/k"):
            backend._check_put("k", data, sent, reply)
    else:
        assert backend._check_put("k", data, sent, reply) is reply


def test_s3_missing_bucket_is_unavailable(s3_settings: S3Storage) -> None:
    backend = S3Backend("offsite", s3_settings.model_copy(update={"bucket": "vw-no-such-bucket"}))
    for call in (backend.check, lambda: backend.get_bytes("x"), lambda: list(backend.list())):
        with pytest.raises(StorageUnavailable, match="bucket 'vw-no-such-bucket' does not exist"):
            call()


def test_s3_large_object_goes_multipart_and_is_verified_by_its_recorded_hash(
        s3_settings: S3Storage, big_file: Path, tmp_path) -> None:
    backend = S3Backend("offsite", s3_settings)
    stored = backend.put_file("web01/vda.qcow2", big_file)
    head = S3Raw(s3_settings).client.head_object(Bucket=s3_settings.bucket, Key="backups/web01/vda.qcow2")
    assert "-" in head["ETag"]  # a multipart ETag: md5-of-parts '-' part count
    assert "sha256" not in head["Metadata"]  # no server-side rewrite just to add it
    S3Raw(s3_settings).corrupt("web01/vda.qcow2")
    with pytest.raises(ChecksumMismatch):  # the manifest's hash catches it
        backend.get_file("web01/vda.qcow2", tmp_path / "vda.qcow2", expected_sha256=stored.sha256)


def test_s3_small_object_carries_sha256(s3_settings: S3Storage, tmp_path) -> None:
    backend = S3Backend("offsite", s3_settings)
    stored = backend.put_bytes("web01/manifest.json", b"{}")
    head = S3Raw(s3_settings).client.head_object(Bucket=s3_settings.bucket, Key="backups/web01/manifest.json")
    assert head["Metadata"]["sha256"] == stored.sha256


def test_s3_describe_hides_credentials() -> None:
    settings = S3Storage(
        type="s3", bucket="b", prefix="/vw/", endpoint_url="https://key:secret@minio.lan:9000",
        access_key_id="AKIA", secret_access_key="s3cr3t",
    )
    text = S3Backend("offsite", settings).describe()
    assert text == "s3://b/vw @ https://minio.lan:9000"


def fake_reply(status: int, code: str) -> tuple[SimpleNamespace, dict]:
    """What botocore would have parsed from an error response (for before-call hooks)."""
    parsed = {"Error": {"Code": code, "Message": f"simulated {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return SimpleNamespace(status_code=status, headers={}, content=b""), parsed


@pytest.mark.parametrize(
    "status, code, error, words",
    [
        (403, "AccessDenied", StorageError, "S3 refused to read s3://"),
        (403, "InvalidAccessKeyId", StorageError, "check the credentials"),
        (403, "SignatureDoesNotMatch", StorageError, "check the credentials"),
        (404, "NoSuchKey", ObjectNotFound, "no object 'web01/x'"),
        (503, "SlowDown", StorageUnavailable, "failed to read"),
        (400, "InvalidRequest", StorageError, "S3 could not read"),
    ],
)
def test_s3_errors_are_mapped(s3_settings: S3Storage, status: int, code: str, error: type, words: str) -> None:
    backend = S3Backend("offsite", s3_settings.model_copy(update={"max_attempts": 1}))
    backend._client().meta.events.register("before-call.s3.GetObject", lambda **_: fake_reply(status, code))
    with pytest.raises(error, match=re.escape(words)) as caught:
        backend.get_bytes("web01/x")
    assert type(caught.value) is error
    assert "testing" not in str(caught.value)  # no credentials in messages


def test_nfs_retries_stale_file_handles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = NfsBackend("nas", NfsStorage(type="nfs", path=str(tmp_path)))
    backend.put_bytes("web01/manifest.json", b"{}")
    failures = iter([True])

    def flaky_open(path, *args, **kwargs):
        if next(failures, False):
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(nfs, "open", flaky_open, raising=False)
    assert backend.get_bytes("web01/manifest.json") == b"{}"

    failures = iter([True] * nfs.STALE_RETRIES)
    with pytest.raises(StorageUnavailable, match="Stale file handle"):
        backend.get_bytes("web01/manifest.json")


# --- S3 integrity in transit (through tests/faultproxy.py, in front of the real endpoint) ---
def _part_number(target: str) -> int:
    return int(parse_qs(urlsplit(target).query)["partNumber"][0])


def test_s3_every_part_carries_the_sha256_of_its_bytes(s3_settings: S3Storage, s3_fault_proxy, big_file: Path) -> None:
    backend = S3Backend("offsite", s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    backend.put_file("web01/vda.qcow2", big_file)
    data = big_file.read_bytes()
    sent = sorted(s3_fault_proxy.requests(upload_part), key=lambda s: _part_number(s.request.target))
    assert len(sent) == 3
    for n, seen in enumerate(sent):
        part = data[n * 5 * MIB:(n + 1) * 5 * MIB]
        assert seen.request.headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(part).digest()).decode()
    create = [s for s in s3_fault_proxy.recorded()
              if s.request.method == "POST" and s.request.target.endswith("?uploads")]
    assert create[0].request.headers["x-amz-checksum-algorithm"] == "SHA256"


def test_s3_small_object_carries_the_sha256_of_its_bytes(s3_settings: S3Storage, s3_fault_proxy) -> None:
    backend = S3Backend("offsite", s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    backend.put_bytes("web01/manifest.json", b"{}")
    put = [s for s in s3_fault_proxy.recorded() if s.request.method == "PUT" and "manifest.json" in s.request.target]
    assert put[0].request.headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(b"{}").digest()).decode()


def test_s3_part_damaged_in_transit_is_never_stored(s3_settings: S3Storage, s3_fault_proxy, big_file: Path,
                                                    tmp_path: Path) -> None:
    """One byte of one part flipped between us and the endpoint. An endpoint that checks
    part checksums (AWS S3, MinIO) refuses the part and it is sent again; one that does
    not (moto) stores it, and the comparison of its checksum of the stored parts with
    ours refuses the object. Either way no damaged object and no upload is left."""
    backend = S3Backend("offsite", s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    s3_fault_proxy.add(Rule(upload_part, "corrupt", times=1))
    raw = S3Raw(s3_settings)
    damaged_answer = None
    try:
        stored = backend.put_file("web01/vda.qcow2", big_file)
    except ChecksumMismatch as e:
        damaged_answer = e
    [damaged] = s3_fault_proxy.handled("corrupt")
    if damaged.status == 400:  # the endpoint refused it by its checksum
        assert b"BadDigest" in damaged.reply
        assert damaged_answer is None
        assert backend.get_file("web01/vda.qcow2", tmp_path / "x", expected_sha256=stored.sha256).size == 13 * MIB
    else:  # the endpoint took it: our check of its checksum must refuse the object
        assert damaged.status == 200
        assert damaged_answer is not None, "a part damaged in transit was stored as if whole"
        assert "damaged in transit" in str(damaged_answer)
        assert not backend.exists("web01/vda.qcow2")
    assert raw.incomplete() == 0


def test_s3_part_answered_slow_down_is_sent_again(s3_settings: S3Storage, s3_fault_proxy, big_file: Path,
                                                   tmp_path: Path) -> None:
    backend = S3Backend("offsite", s3_settings.model_copy(update={"endpoint_url": s3_fault_proxy.url}))
    s3_fault_proxy.add(Rule(upload_part, "respond", times=2, status=503))
    stored = backend.put_file("web01/vda.qcow2", big_file)
    assert len(s3_fault_proxy.handled("respond")) == 2
    assert len([s for s in s3_fault_proxy.requests(upload_part) if s.status == 200]) == 3
    assert S3Raw(s3_settings).incomplete() == 0
    assert backend.get_file("web01/vda.qcow2", tmp_path / "x", expected_sha256=stored.sha256).sha256 == sha(big_file)


def test_s3_part_size_grows_only_to_stay_within_10000_parts() -> None:
    assert s3._part_size(13 * MIB, 5 * MIB) == 5 * MIB
    assert s3._part_size(10_000 * 5 * MIB, 5 * MIB) == 5 * MIB
    grown = s3._part_size(10_000 * 5 * MIB + 1, 5 * MIB)
    assert grown == 6 * MIB and -(-(10_000 * 5 * MIB + 1) // grown) <= 10_000


def test_s3_composite_checksum_is_the_sha256_of_the_part_sha256s() -> None:
    parts = [b"a" * 10, b"b" * 3]
    digests = [hashlib.sha256(p).digest() for p in parts]
    ours = s3._composite([base64.b64encode(d).decode() for d in digests])
    assert ours == base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    assert s3._same_checksum(f"{ours}-2", f"{ours}-2") and s3._same_checksum(ours, f"{ours}-2")
    assert not s3._same_checksum(f"{ours}-3", f"{ours}-2")
    assert not s3._same_checksum(f"{ours}-2", base64.b64encode(hashlib.sha256(b"x").digest()).decode())
