"""Objects in an S3 bucket: AWS, or any S3-compatible endpoint (MinIO, Ceph RGW, ...).

A key ``web01/3f2a/vda.qcow2`` is the object ``<prefix>/web01/3f2a/vda.qcow2``. boto3 is
imported here and nowhere else; its errors become product errors once, in ``_errors``.

Integrity, end to end. ``put_file`` returns the object's SHA-256, which the caller
records (the manifest); ``get_file`` checks it when given ``expected_sha256``. On the way
in, every request that carries data also carries a checksum the endpoint can check:

- a multipart upload is created with ``ChecksumAlgorithm=SHA256`` and each part is sent
  with the SHA-256 of exactly the bytes in that request (``x-amz-checksum-sha256``). AWS
  S3 and MinIO recompute it and refuse a part that arrived different (``BadDigest``); a
  refused part is sent again, up to ``max_attempts`` times;
- after completion, the endpoint's own checksum of the stored object (``HeadObject``
  with ``ChecksumMode=ENABLED``: the SHA-256 of the parts' SHA-256s, "composite") is
  compared with the one computed from the parts we sent, together with the length.
  This catches endpoints that accept a checksum header without checking it (moto, the
  test suite's endpoint, is one); such an object is deleted and ``ChecksumMismatch``
  raised. Endpoints that report no checksum are checked by length only;
- objects below one part (manifests, format-2 chunks and indexes) are sent with their
  SHA-256 as ``x-amz-checksum-sha256`` and in the metadata key ``sha256``, checked on
  every read. An endpoint that checked the header echoes it in its answer; one that
  answers without it did not look at it (moto), and then its ETag, for a plain upload
  the MD5 of the bytes it stored, is compared with the MD5 of what was sent: a mismatch
  is sent again like a BadDigest, and the object is deleted when the last attempt
  still arrives damaged (unless another writer replaced it meanwhile). So no damaged
  object is left under a name (a later backup would take a format-2 chunk that is there
  as stored). ETags that are not an MD5 (SSE-KMS, SSE-C) are not compared;

Downloads ask for the endpoint's checksum (``ChecksumMode=ENABLED``): botocore checks a
whole-object checksum while the body streams; a composite one cannot be checked without
the part boundaries, and the SHA-256 from the manifest is what proves those objects.

Uploads run ``max_concurrency`` parts of ``part_size_mib`` at a time, each read with
``pread`` by the thread that sends it, while one thread hashes the whole file: memory
stays near part size times concurrency. S3 completes a multipart upload atomically, so
no reader sees half an object; a failed upload is aborted, and ``cleanup_incomplete()``
aborts what a killed process left behind.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as EndpointDown
from virtwarden.storage_backends import _stream as s
from virtwarden.storage_backends.base import CHUNK, Backend, Blob, ObjectInfo, Progress, StoredObject

from virtwarden.config import S3Storage
from virtwarden.errors import (
    ChecksumMismatch,
    ConfigError,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    VirtwardenError,
)
from virtwarden.redact import mask

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_REGION = "us-east-1"
MAX_PARTS = 10_000  # S3's limit per multipart upload
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                     "ExpiredToken", "InvalidToken", "AllAccessDisabled"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_THERE = frozenset({"PreconditionFailed", "412"})  # a PUT with If-None-Match: * met an object
_RACED = frozenset({"ConditionalRequestConflict", "409"})  # ... met a conditional write under way
_NO_CONDITION = frozenset({"NotImplemented", "501", "InvalidArgument", "InvalidRequest"})  # ... is not understood
_STREAM_BROKE = (ReadTimeoutError, ResponseStreamingError, IncompleteReadError)
# The endpoint received other bytes than were sent (checksum or signed payload hash).
_DAMAGED = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
_MD5_ETAG = re.compile(r'"?([0-9a-f]{32})"?')  # a plain PUT's ETag; a multipart one ends in -N


class _StoredDamaged(Exception):
    """The endpoint accepted a PUT but says it stored other bytes than were sent; ``etag``:
    what it answered for them."""

    def __init__(self, message: str, etag: str = "") -> None:
        super().__init__(message)
        self.etag = etag

_loader: Any = None
_loader_guard = threading.Lock()


def _botocore_session() -> botocore.session.Session:
    """A new botocore session that shares this process's loader of service models. Each new
    session would otherwise read and parse S3's model files again: about 0.1 s of a core for
    every backend a worker's job or a command builds. The loader only caches read-only
    models; credentials, configuration and connections stay per session."""
    global _loader
    session = botocore.session.get_session()
    with _loader_guard:
        if _loader is None:  # the first session's own (it honours AWS_DATA_PATH)
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
    return session


class S3Backend(Backend):
    kind = "s3"
    costly_lookups = True  # every exists() is a HEAD request

    def __init__(self, name: str, settings: S3Storage) -> None:
        super().__init__(name)
        if (settings.access_key_id is None) != (settings.secret_access_key is None):
            raise ConfigError(f"storage '{name}': set both access_key_id and secret_access_key, or neither")
        self.settings = settings
        self.bucket = settings.bucket
        self.who = f"storage '{name}'"
        region = settings.region or DEFAULT_REGION
        self.endpoint = _mask(settings.endpoint_url) if settings.endpoint_url else f"AWS {region}"
        self.part_size = settings.part_size_mib * MIB
        self.chunk_concurrency = settings.chunk_concurrency
        self._conditional = True  # False once the endpoint has refused a conditional PUT as such
        self._s3: Any = None
        self._guard = threading.Lock()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.settings.prefix} @ {self.endpoint}"

    def close(self) -> None:
        with self._guard:
            if self._s3 is not None:
                self._s3.close()
                self._s3 = None

    # --- lifecycle ---------------------------------------------------------------
    def check(self) -> None:
        probe = self._full(s.temp_name("probe"))
        with self._errors("check", None):
            client = self._client()
            client.head_bucket(Bucket=self.bucket)
            # With a checksum, like every write: an endpoint that refuses the header fails here.
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe",
                              ChecksumSHA256=_b64(sha256(b"probe").digest()), **self._sse())
            client.delete_object(Bucket=self.bucket, Key=probe)

    # --- objects -----------------------------------------------------------------
    def put_bytes(self, key: str, data: Blob) -> StoredObject:
        digest = self._put_small(key, data, conditional=False)
        assert digest is not None
        return StoredObject(key, len(data), digest)

    def put_new_bytes(self, key: str, data: Blob) -> bool:
        """One PUT with ``If-None-Match: *``: the endpoint stores the object unless one is
        there (412, False), so an object already stored is never replaced, not even by
        bytes damaged on their way. An endpoint that ignores the condition (older
        S3-compatible servers) replaces the object: for a format-2 chunk, with the same
        data; one that refuses it (501 NotImplemented, 400 InvalidArgument) gets a
        lookup, then a PUT, from then on."""
        if not self._conditional:
            return super().put_new_bytes(key, data)
        return self._put_small(key, data, conditional=True) is not None

    def _put_small(self, key: str, data: Blob, *, conditional: bool) -> str | None:
        """Store ``data`` in one PUT, checked (``_check_put``) and sent again while it
        arrives damaged; its SHA-256, or None when ``conditional`` and an object was there.
        When the endpoint stored a conditional PUT's bytes damaged (it does not check
        checksums: moto), what is there is that PUT's own object, and the next attempts
        replace it unconditionally. The last attempt damaged too removes the object."""
        full = self._full(s.check_data_key(key))
        digest = sha256(data)
        checksum = _b64(digest.digest())
        condition: dict[str, str] = {"IfNoneMatch": "*"} if conditional else {}

        def send() -> dict:
            try:
                return self._check_put(full, data, checksum, self._client().put_object(
                    Bucket=self.bucket, Key=full, Body=data, ChecksumSHA256=checksum,
                    Metadata={"sha256": digest.hexdigest()}, **condition, **self._sse()))
            except _StoredDamaged:
                condition.clear()  # the object there is this PUT's own, damaged: replace it
                raise

        with self._errors("upload", key):
            try:
                self._resend_damaged(full, send)
            except ClientError as e:
                if not conditional:
                    raise
                if _code(e) in _THERE:
                    return None
                if _code(e) in _RACED:  # another writer's conditional PUT of this key is under way
                    return digest.hexdigest() if super().put_new_bytes(key, data) else None
                if _code(e) in _NO_CONDITION and condition:  # an endpoint without conditional writes
                    self._conditional = False
                    log.warning("%s: %s refused a conditional PUT (%s): looking each chunk up before storing it "
                                "instead", self.who, self.endpoint, _code(e))
                    return digest.hexdigest() if super().put_new_bytes(key, data) else None
                raise
            except _StoredDamaged as e:
                self._delete_if_unchanged(full, e.etag)
                raise ChecksumMismatch(f"{self.who}: {e}: damaged in transit and the endpoint did not refuse it; "
                                       f"the object was removed") from None
        return digest.hexdigest()

    def _delete_if_unchanged(self, full: str, etag: str) -> None:
        """Delete the damaged object, unless another writer has replaced it meanwhile (a
        format-2 chunk another backup stored under the same name, whole)."""
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as e:
            log.warning("%s: could not look at %s to remove it: %s", self.who, full, e)
            return
        if str(head.get("ETag", "")).strip('"') == etag:
            self._delete_quietly(full)

    def _check_put(self, full: str, data: Blob, checksum: str, reply: dict) -> dict:
        """``reply`` of a PUT of ``data``, once it shows the endpoint stored those bytes
        (see the module's docstring); _StoredDamaged when it shows other bytes."""
        theirs = reply.get("ChecksumSHA256")
        if theirs:  # the endpoint took the checksum: it refuses (BadDigest) what does not match
            if theirs != checksum:
                raise _StoredDamaged(f"the endpoint's checksum of {self._where_full(full)} is {theirs}, what was "
                                     f"sent gives {checksum}", str(reply.get("ETag", "")).strip('"'))
            return reply
        etag = _MD5_ETAG.fullmatch(str(reply.get("ETag", "")))
        if etag is None or self.settings.sse == "aws:kms":
            return reply  # no MD5 to compare with
        sent = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if etag.group(1) != sent:
            raise _StoredDamaged(f"the endpoint stored {self._where_full(full)} with ETag {etag.group(1)}, the MD5 "
                                 f"of what was sent is {sent}", etag.group(1))
        return reply

    def put_file(self, key: str, source: Path, *, progress: Progress | None = None) -> StoredObject:
        full = self._full(s.check_data_key(key))
        with self._errors("upload", key, local=source), open(source, "rb") as f:
            if os.fstat(f.fileno()).st_size < self.part_size:
                stored = self.put_bytes(key, f.read())  # below one part: memory is bounded
                if progress:
                    progress(stored.size)
                return stored
        with self._errors("upload", key, local=source):
            size, digest = self._upload(source, full, progress)
        return StoredObject(key, size, digest)

    def _upload(self, source: Path, full: str, progress: Progress | None) -> tuple[int, str]:
        """Multipart upload of a file that does not change meanwhile (ours, in scratch
        space), while one thread hashes the whole file. Completed, then checked against
        the endpoint's own checksum; aborted on any failure."""
        hashed: dict[str, Any] = {}

        def hash_it() -> None:
            try:
                hashed["result"] = s.hash_file(source)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                hashed["error"] = e

        hasher = threading.Thread(target=hash_it, name="sha256", daemon=True)
        hasher.start()
        client = self._client()
        upload_id = client.create_multipart_upload(
            Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", **self._sse())["UploadId"]
        try:
            parts = self._send_parts(source, full, upload_id, progress)
            client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": [p.reply() for p in parts]})
        except BaseException:
            self._abort(full, upload_id)
            raise
        finally:
            hasher.join()
        if "error" in hashed:
            self._delete_quietly(full)
            raise hashed["error"]
        size, digest = hashed["result"]
        self._check_stored(full, size, digest, parts)
        return size, digest

    def _send_parts(self, source: Path, full: str, upload_id: str, progress: Progress | None) -> list[_Part]:
        """Every part of ``source``, ``max_concurrency`` at a time (each thread reads its
        part, so at most that many parts are in memory). Progress is reported from this
        thread, never from the senders."""
        size = source.stat().st_size
        part = _part_size(size, self.part_size)
        spans = [(n, offset, min(part, size - offset)) for n, offset in enumerate(range(0, size, part), 1)]
        done: list[_Part] = []
        if progress:
            progress(0)
        fd = os.open(source, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(self.settings.max_concurrency, thread_name_prefix="s3-part") as pool:
                running: set[Future[_Part]] = set()
                for span in spans:
                    if len(running) >= self.settings.max_concurrency:
                        running = self._collect(running, done, progress)
                    running.add(pool.submit(self._send_part, fd, full, upload_id, *span))
                while running:
                    running = self._collect(running, done, progress)
        finally:
            os.close(fd)
        return sorted(done, key=lambda p: p.number)

    def _collect(self, running: set[Future[_Part]], done: list[_Part], progress: Progress | None) -> set[Future[_Part]]:
        finished, rest = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                done.append(future.result())
            except BaseException:
                for other in rest:
                    other.cancel()
                raise
        if progress:
            progress(sum(p.size for p in done))
        return rest

    def _send_part(self, fd: int, full: str, upload_id: str, number: int, offset: int, length: int) -> _Part:
        data = _read_part(fd, length, offset)
        if len(data) != length:
            raise StorageError(f"{self.who}: the file for {self._where_full(full)} shrank while it was uploaded "
                               f"(part {number} is short)")
        checksum = _b64(sha256(data).digest())
        reply = self._resend_damaged(f"{full} part {number}", lambda: self._client().upload_part(
            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data,
            ChecksumSHA256=checksum))
        echoed = reply.get("ChecksumSHA256")
        if echoed and echoed != checksum:
            raise ChecksumMismatch(f"{self.who}: the endpoint stored part {number} of {self._where_full(full)} "
                                   f"with sha256 {echoed}, but {checksum} was sent")
        return _Part(number, length, reply["ETag"], checksum)

    def _resend_damaged(self, what: str, send: Callable[[], dict]) -> dict:
        """Send again what the endpoint refused because it arrived damaged (its checksum
        did not match the bytes received); botocore already retries 5xx and throttling."""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return send()
            except _StoredDamaged as e:
                if attempt == self.settings.max_attempts:
                    raise
                log.warning("%s: %s: %s (damaged in transit); sending it again (attempt %d of %d)",
                            self.who, self.endpoint, e, attempt + 1, self.settings.max_attempts)
            except ClientError as e:
                if _code(e) not in _DAMAGED or attempt == self.settings.max_attempts:
                    raise
                log.warning("%s: %s refused %s: %s (damaged in transit); sending it again (attempt %d of %d)",
                            self.who, self.endpoint, what, _code(e), attempt + 1, self.settings.max_attempts)
        raise AssertionError("unreachable")

    def _check_stored(self, full: str, size: int, digest: str, parts: list[_Part]) -> None:
        """Compare what the endpoint says it stored with what was sent: the length, and
        its SHA-256 when it reports one (of the parts' SHA-256s, or of the whole object
        where it says ``FULL_OBJECT``). A mismatch deletes the object."""
        head = self._client().head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
        theirs = head.get("ChecksumSHA256")
        ours = _sent_checksum(head.get("ChecksumType"), digest, parts)
        problem = None
        if head["ContentLength"] != size:
            problem = f"{size} bytes were uploaded but the endpoint stores {head['ContentLength']}"
        elif theirs and not _same_checksum(theirs, ours):
            problem = (f"the endpoint's checksum of what it stored is {theirs}, what was sent gives {ours}:"
                       " a part was damaged in transit and the endpoint did not refuse it")
        if problem:
            self._delete_quietly(full)
            raise ChecksumMismatch(f"{self.who}: {self._where_full(full)}: {problem}; the object was removed")
        if not theirs:
            log.debug("%s: %s reports no checksum for %s; checked by length only", self.who, self.endpoint, full)

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client().abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError) as e:  # cleanup_incomplete() aborts it later
            log.warning("%s: could not abort the upload of %s: %s", self.who, full, e)

    def _delete_quietly(self, full: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as e:
            log.warning("%s: could not delete %s: %s", self.who, full, e)

    def get_file(
        self,
        key: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
        durable: bool = True,
    ) -> StoredObject:
        full = self._full(s.check_key(key))
        with self._errors("download", key, local=dest):
            s.make_dirs(dest.parent, fsync=False)
            reply = self._client().get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
            expected = expected_sha256 or reply.get("Metadata", {}).get("sha256")
            length = reply["ContentLength"]

            def verify(size: int, digest: str) -> None:
                if size != length:
                    raise StorageError(f"{self.who}: {self._where(key)} ended after {size} of {length} bytes")
                if expected and digest != expected:
                    raise s.checksum_error(self.who, key, expected, digest)

            size, digest = s.write_atomic(dest, self._body(full, reply), fsync=durable, verify=verify,
                                          progress=progress)
        return StoredObject(key, size, digest)

    def _body(self, full: str, reply: dict) -> Iterator[bytes]:
        """The object's bytes; a stream that breaks midway resumes with a Range request
        pinned to the same ETag, instead of starting a large download again."""
        done, body, attempt = 0, reply["Body"], 1
        try:
            while True:
                try:
                    for chunk in body.iter_chunks(CHUNK):
                        done += len(chunk)
                        yield chunk
                    return
                except _STREAM_BROKE as e:
                    if attempt >= self.settings.max_attempts:
                        raise
                    attempt += 1
                    log.warning("%s: download of %s broke after %d bytes (%s); resuming", self.who, full, done, e)
                    body.close()
                    body = self._client().get_object(
                        Bucket=self.bucket, Key=full, Range=f"bytes={done}-", IfMatch=reply["ETag"]
                    )["Body"]
        finally:
            body.close()

    def verify(self, key: str, expected_sha256: str, *, progress: Progress | None = None) -> int:
        full = self._full(s.check_key(key))
        digest, size = sha256(), 0
        with self._errors("verify", key):
            reply = self._client().get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
            for chunk in self._body(full, reply):
                digest.update(chunk)
                size += len(chunk)
                if progress:
                    progress(size)
        if digest.hexdigest() != expected_sha256:
            raise s.checksum_error(self.who, key, expected_sha256, digest.hexdigest())
        return size

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes. A body whose transfer broke (the connection dropped or
        stalled after the answer began, which botocore does not retry) is read again, up
        to ``max_attempts`` times in all: a format-2 restore reads thousands of these, and
        one dropped connection should not fail it."""
        full = self._full(s.check_key(key))
        attempt = 1
        while True:
            with self._errors("read", key):
                reply = self._client().get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
                try:
                    data = reply["Body"].read()
                    break
                except _STREAM_BROKE as e:
                    if attempt >= self.settings.max_attempts:
                        raise
                    attempt += 1
                    log.warning("%s: reading %s broke (%s); reading it again", self.who, full, e)
        expected = reply.get("Metadata", {}).get("sha256")
        if expected and sha256(data).hexdigest() != expected:
            raise s.checksum_error(self.who, key, expected, sha256(data).hexdigest())
        return data

    def exists(self, key: str) -> bool:
        full = self._full(s.check_key(key))
        with self._errors("stat", key):
            try:
                self._client().head_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if _code(e) in _MISSING:
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._list(self._full(s.check_prefix(prefix)))

    def _list(self, full_prefix: str) -> Iterator[ObjectInfo]:
        """S3 returns keys in ascending UTF-8 order, which is the order list() promises."""
        skip = len(self._full(""))
        with self._errors("list", full_prefix[skip:] or None):
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][skip:]
                    if not s.is_hidden(key):
                        modified = item.get("LastModified")  # the endpoint's clock
                        yield ObjectInfo(key, item["Size"], modified.timestamp() if modified else None)

    def delete(self, key: str) -> None:
        full = self._full(s.check_key(key))
        with self._errors("delete", key):
            self._client().delete_object(Bucket=self.bucket, Key=full)

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Abort unfinished multipart uploads (and remove stray probe objects) under
        ``prefix``. An upload in progress is unfinished too: call this only while no
        writer is active there."""
        full = self._full(s.check_prefix(prefix))
        removed = 0
        with self._errors("clean up", prefix or None):
            client = self._client()
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
                for upload in page.get("Uploads", []):
                    try:
                        client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except ClientError as e:
                        if _code(e) != "NoSuchUpload":
                            raise
                    log.info("%s: aborted unfinished upload of %s", self.who, upload["Key"])
                    removed += 1
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    if item["Key"].rpartition("/")[2].startswith(s.TMP_PREFIX):
                        client.delete_object(Bucket=self.bucket, Key=item["Key"])
                        removed += 1
        return removed

    # --- helpers -----------------------------------------------------------------
    def _client(self) -> Any:
        """Built on first use, so constructing a backend costs nothing; credentials come
        from the settings when given, else from boto3's usual chain (env, role, ...)."""
        with self._guard:
            if self._s3 is None:
                st = self.settings
                session = boto3.session.Session(
                    botocore_session=_botocore_session(),
                    aws_access_key_id=st.access_key_id,
                    aws_secret_access_key=st.secret_access_key,
                    region_name=st.region or DEFAULT_REGION,
                )
                config = Config(
                    retries={"max_attempts": st.max_attempts, "mode": "standard"},
                    connect_timeout=st.connect_timeout,
                    read_timeout=st.read_timeout,
                    # Every request in flight keeps a connection: multipart uploads' parts,
                    # format-2 chunks.
                    max_pool_connections=max(st.max_concurrency, st.chunk_concurrency) + 4,
                    # S3-compatible endpoints rarely serve bucket-named virtual hosts.
                    s3={"addressing_style": "path"} if st.endpoint_url else None,
                )
                self._s3 = session.client("s3", endpoint_url=st.endpoint_url, config=config)
            return self._s3

    def _full(self, key: str) -> str:
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    def _where(self, key: str | None) -> str:
        return self._where_full(self._full(key)) if key else f"s3://{self.bucket}"

    def _where_full(self, full: str) -> str:
        return f"s3://{self.bucket}/{full}"

    def _sse(self) -> dict[str, str]:
        st = self.settings
        extra: dict[str, str] = {"ServerSideEncryption": st.sse} if st.sse else {}
        if st.sse == "aws:kms" and st.kms_key_id:
            extra["SSEKMSKeyId"] = st.kms_key_id
        return extra

    @contextmanager
    def _errors(self, op: str, key: str | None, local: Path | None = None) -> Iterator[None]:
        """Turn boto3/botocore (and local file) errors into the product's, once, here."""
        try:
            yield
        except VirtwardenError:
            raise
        except ClientError as e:
            raise self._client_error(e, op, key) from e
        except (EndpointDown, HTTPClientError) as e:
            raise StorageUnavailable(f"{self.who}: S3 endpoint {self.endpoint} unreachable: {e}") from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StorageError(
                f"{self.who}: no S3 credentials: set access_key_id and secret_access_key,"
                " or provide them the usual AWS way (environment, profile, instance role)"
            ) from e
        except FlexibleChecksumError as e:
            raise ChecksumMismatch(f"{self.who}: {self._where(key)} failed its transfer checksum: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"{self.who}: could not {op} {self._where(key)}: {e}") from e
        except OSError as e:
            raise s.os_error(self.who, e, local or Path.cwd()) from e

    def _client_error(self, e: ClientError, op: str, key: str | None) -> VirtwardenError:
        code = _code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = e.response.get("Error", {}).get("Message") or code
        where = self._where(key)
        if code == "NoSuchBucket" or (key is None and code in _MISSING):
            return StorageUnavailable(f"{self.who}: bucket {self.bucket!r} does not exist at {self.endpoint}")
        if code in _MISSING:
            return ObjectNotFound(f"{self.who}: no object {key!r} ({where})")
        if code in _DAMAGED:
            return ChecksumMismatch(
                f"{self.who}: S3 endpoint {self.endpoint} refused to {op} {where}: {code}: the bytes it"
                f" received did not match the checksum sent with them (damaged in transit): {detail}"
            )
        if code in _DENIED:
            return StorageError(
                f"{self.who}: S3 refused to {op} {where}: {code} (check the credentials,"
                f" and that they may {op} in bucket {self.bucket!r})"
            )
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            return StorageUnavailable(
                f"{self.who}: S3 endpoint {self.endpoint} failed to {op} {where}"
                f" after {self.settings.max_attempts} attempts: {code}: {detail}"
            )
        return StorageError(f"{self.who}: S3 could not {op} {where}: {code}: {detail}")


@dataclass(frozen=True)
class _Part:
    """One uploaded part: what CompleteMultipartUpload needs, and its size."""

    number: int
    size: int
    etag: str
    checksum: str  # base64 SHA-256 of the bytes sent

    def reply(self) -> dict[str, Any]:
        return {"PartNumber": self.number, "ETag": self.etag, "ChecksumSHA256": self.checksum}


def _read_part(fd: int, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _part_size(size: int, wanted: int) -> int:
    """The configured part size, grown (in whole MiB) where the file needs more than
    S3's 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    return max(wanted, -(-needed // MIB) * MIB)


def _composite(checksums: list[str]) -> str:
    """S3's checksum of a multipart object: the SHA-256 of the parts' SHA-256s."""
    return _b64(sha256(b"".join(base64.b64decode(c) for c in checksums)).digest())


def _sent_checksum(kind: str | None, digest: str, parts: list[_Part]) -> str:
    """What the endpoint must report for what was sent: the whole object's SHA-256
    where it says ``FULL_OBJECT``, else S3's composite ``<base64>-<part count>``."""
    if kind == "FULL_OBJECT":
        return _b64(bytes.fromhex(digest))
    return f"{_composite([p.checksum for p in parts])}-{len(parts)}"


def _same_checksum(theirs: str, ours: str) -> bool:
    """Equal, or equal but for the part count some endpoints leave off a composite
    (base64 has no '-', so it only ever separates the count)."""
    return theirs == ours or ("-" in ours and theirs == ours.rpartition("-")[0])


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _mask(url: str) -> str:
    """Drop any user:password from an endpoint URL before it reaches a message or log."""
    parts = urlsplit(url)
    return mask(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))

