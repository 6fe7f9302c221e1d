"""Objects in an S3 bucket: AWS, or any S3-compatible endpoint (MinIO, Ceph RGW, ...).

A key ``web01/3f2a/vda.qcow2`` is the object ``<prefix>/web01/3f2a/vda.qcow2``. boto3 is
imported here and nowhere else; its errors become product errors once, in ``_errors``.

Uploads go through s3transfer in parts of ``part_size_mib``, ``max_concurrency`` at a
time, the parts read in parallel as ``upload_file`` reads them, while one thread hashes
the file: memory stays near part size times concurrency. ``put_file`` returns the
SHA-256, which the caller records (the manifest);
``get_file`` checks it when given ``expected_sha256``. Objects below one part (manifests)
are hashed in memory and also carry it in the metadata key ``sha256``, checked on every
read. Larger ones do not: S3 fixes metadata when an upload starts, before a byte is
hashed, and adding it afterwards means the endpoint rewrites the whole object (a
self-copy), which doubles the cost of every disk image. S3 completes a multipart
upload atomically, so no reader sees half an object; s3transfer aborts a failed one, and
``cleanup_incomplete()`` aborts what a killed process left behind.

Locks are objects ``locks/<name>.lock`` created with a conditional PUT
(``If-None-Match: *``), refreshed every ttl/3 with ``If-Match`` and broken, once older
than ttl, by a conditional overwrite of the stale ETag, so of two breakers only one wins.
Ages use the endpoint's clock (``Date`` minus ``Last-Modified``). Endpoints that answer
501 to conditional writes fall back to head-then-put, re-reading the lock afterwards:
two processes racing inside that gap can still both believe they hold it. Endpoints that
silently ignore the headers cannot be told apart and have the same race.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from s3transfer.subscribers import BaseSubscriber
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError, HTTPClientError
from botocore.exceptions import ConnectionError as EndpointDown
from botocore.exceptions import IncompleteReadError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ReadTimeoutError, ResponseStreamingError

from storage_backends import _stream as s
from storage_backends.base import CHUNK, Backend, ObjectInfo, Progress, StoredObject
from virtwarden.config import S3Storage
from virtwarden.errors import ChecksumMismatch, ConfigError, LockHeld, ObjectNotFound
from virtwarden.errors import StorageError, StorageUnavailable, VirtwardenError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_REGION = "us-east-1"
PROGRESS_POLL = 0.25  # seconds between progress reports during an upload
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                     "ExpiredToken", "InvalidToken", "AllAccessDisabled"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_UNSUPPORTED = frozenset({"NotImplemented", "501"})
_STREAM_BROKE = (ReadTimeoutError, ResponseStreamingError, IncompleteReadError)


class S3Backend(Backend):
    kind = "s3"

    def __init__(self, name: str, settings: S3Storage) -> None:
        super().__init__(name)
        if (settings.access_key_id is None) != (settings.secret_access_key is None):
            raise ConfigError(f"storage '{name}': set both access_key_id and secret_access_key, or neither")
        self.settings = settings
        self.bucket = settings.bucket
        self.who = f"storage '{name}'"
        region = settings.region or DEFAULT_REGION
        self.endpoint = _mask(settings.endpoint_url) if settings.endpoint_url else f"AWS {region}"
        part = settings.part_size_mib * MIB
        self._transfer = TransferConfig(
            multipart_threshold=part,
            multipart_chunksize=part,
            max_concurrency=settings.max_concurrency,
            preferred_transfer_client="classic",
        )
        # Parts read ahead of the uploads; the default (10) would hold 10 parts in memory.
        self._transfer.max_in_memory_upload_chunks = settings.max_concurrency
        self._s3: Any = None
        self._guard = threading.Lock()
        self._conditional = True  # False once the endpoint answered 501 to If-None-Match

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
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe", **self._sse())
            client.delete_object(Bucket=self.bucket, Key=probe)

    # --- objects -----------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        full = self._full(s.check_data_key(key))
        digest = sha256(data).hexdigest()
        with self._errors("upload", key):
            self._client().put_object(
                Bucket=self.bucket, Key=full, Body=data, Metadata={"sha256": digest}, **self._sse()
            )
        return StoredObject(key, len(data), digest)

    def put_file(self, key: str, source: Path, *, progress: Progress | None = None) -> StoredObject:
        full = self._full(s.check_data_key(key))
        with self._errors("upload", key, local=source), open(source, "rb") as f:
            if os.fstat(f.fileno()).st_size < self._transfer.multipart_threshold:
                stored = self.put_bytes(key, f.read())  # below one part: memory is bounded
                if progress:
                    progress(stored.size)
                return stored
        with self._errors("upload", key, local=source):
            size, digest = self._upload(source, full, progress)
            head = self._client().head_object(Bucket=self.bucket, Key=full)
            if head["ContentLength"] != size:
                raise StorageError(
                    f"{self.who}: uploaded {size} bytes to {self._where(key)}"
                    f" but the endpoint stores {head['ContentLength']}"
                )
        return StoredObject(key, size, digest)

    def _upload(self, source: Path, full: str, progress: Progress | None) -> tuple[int, str]:
        """Multipart upload of a file that does not change meanwhile (ours, in scratch
        space): s3transfer reads its parts in parallel, as a plain upload_file does, while
        one thread hashes the file; memory stays at part size x concurrency. Progress is
        reported from this thread, never from s3transfer's workers."""
        hashed: dict[str, Any] = {}

        def hash_it() -> None:
            try:
                hashed["result"] = s.hash_file(source)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                hashed["error"] = e

        sent = _Sent()
        hasher = threading.Thread(target=hash_it, name="sha256", daemon=True)
        hasher.start()
        with create_transfer_manager(self._client(), self._transfer) as manager:
            future = manager.upload(str(source), self.bucket, full, extra_args=self._sse(), subscribers=[sent])
            reported = -1
            while progress and not future.done():
                time.sleep(PROGRESS_POLL)
                if sent.total != reported:
                    reported = sent.total
                    progress(reported)
            future.result()
        hasher.join()
        if "error" in hashed:
            raise hashed["error"]
        if progress:
            progress(hashed["result"][0])
        return hashed["result"]

    def get_file(
        self,
        key: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> StoredObject:
        full = self._full(s.check_key(key))
        with self._errors("download", key, local=dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            reply = self._client().get_object(Bucket=self.bucket, Key=full)
            expected = expected_sha256 or reply.get("Metadata", {}).get("sha256")
            length = reply["ContentLength"]

            def verify(size: int, digest: str) -> None:
                if size != length:
                    raise StorageError(f"{self.who}: {self._where(key)} ended after {size} of {length} bytes")
                if expected and digest != expected:
                    raise s.checksum_error(self.who, key, expected, digest)

            size, digest = s.write_atomic(dest, self._body(full, reply), verify=verify, progress=progress)
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
            reply = self._client().get_object(Bucket=self.bucket, Key=full)
            for chunk in self._body(full, reply):
                digest.update(chunk)
                size += len(chunk)
                if progress:
                    progress(size)
        if digest.hexdigest() != expected_sha256:
            raise s.checksum_error(self.who, key, expected_sha256, digest.hexdigest())
        return size

    def get_bytes(self, key: str) -> bytes:
        full = self._full(s.check_key(key))
        with self._errors("read", key):
            reply = self._client().get_object(Bucket=self.bucket, Key=full)
            data = reply["Body"].read()
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
                        yield ObjectInfo(key, item["Size"])

    def delete(self, key: str) -> None:
        full = self._full(s.check_key(key))
        with self._errors("delete", key):
            self._client().delete_object(Bucket=self.bucket, Key=full)

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Abort unfinished multipart uploads (and remove stray probe objects) under
        ``prefix``. An upload in progress is unfinished too: call this only while no
        writer is active there (hold the matching lock)."""
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

    # --- locks -------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, *, ttl: float = 300.0) -> Iterator[None]:
        rel = s.lock_key(name)
        full = self._full(rel)
        holder = s.holder_info()
        with self._errors("lock", rel):
            etag = self._acquire(name, full, holder, ttl)
        state = {"etag": etag}
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(full, holder, ttl, stop, state), name=f"lock-{name}", daemon=True
        )
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with self._errors("unlock", rel):
                self._release(name, full, holder, state["etag"])

    def _acquire(self, name: str, full: str, holder: dict, ttl: float) -> str:
        for _ in range(3):
            if not self._conditional:
                return self._acquire_racy(name, full, holder, ttl)
            try:
                return self._put_lock(full, holder, IfNoneMatch="*")
            except ClientError as e:
                if not self._tolerate(e):
                    raise
            current = self._lock_state(full)
            if current is None:
                continue  # released meanwhile
            meta, age, stale_etag = current
            if age <= ttl:
                raise s.lock_held(self.who, name, meta, ttl)
            try:
                etag = self._put_lock(full, holder, IfMatch=stale_etag)
            except ClientError as e:
                if not self._tolerate(e, also=_MISSING):
                    raise
                continue
            log.warning("%s: broke stale lock %s held by %s", self.who, name, meta)
            return etag
        raise LockHeld(f"{self.who}: lock {name!r} is contended; try again")

    def _tolerate(self, e: ClientError, also: frozenset[str] = frozenset()) -> bool:
        """A lost race is expected; a 501 switches this backend to the racy fallback."""
        code = _code(e)
        if code in _UNSUPPORTED:
            log.warning("%s: %s rejects conditional writes; locks fall back to head-then-put", self.who, self.endpoint)
            self._conditional = False
        return code in _UNSUPPORTED or code in _LOST_RACE or code in also

    def _acquire_racy(self, name: str, full: str, holder: dict, ttl: float) -> str:
        current = self._lock_state(full)
        if current is not None and current[1] <= ttl:
            raise s.lock_held(self.who, name, current[0], ttl)
        self._put_lock(full, holder)
        again = self._lock_state(full)  # narrows the race; see the module docstring
        if again is None or again[0].get("token") != holder["token"]:
            raise LockHeld(f"{self.who}: lock {name!r} is contended; try again")
        return again[2]

    def _put_lock(self, full: str, holder: dict, **condition: str) -> str:
        reply = self._client().put_object(
            Bucket=self.bucket, Key=full, Body=json.dumps(holder).encode(),
            Metadata={k: str(v) for k, v in holder.items()}, **condition, **self._sse(),
        )
        return reply["ETag"]

    def _lock_state(self, full: str) -> tuple[dict, float, str] | None:
        """The lock's holder metadata, its age on the endpoint's clock, and its ETag."""
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=full)
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        return head.get("Metadata", {}), (now - head["LastModified"]).total_seconds(), head["ETag"]

    def _heartbeat(self, full: str, holder: dict, ttl: float, stop: threading.Event, state: dict) -> None:
        while not stop.wait(ttl / 3):
            try:
                if not self._conditional:
                    current = self._lock_state(full)
                    if current is None or current[0].get("token") != holder["token"]:
                        log.error("%s: lock %s was lost (broken by another holder)", self.who, full)
                        return
                    state["etag"] = self._put_lock(full, holder)
                else:
                    state["etag"] = self._put_lock(full, holder, IfMatch=state["etag"])
            except ClientError as e:
                if _code(e) in _LOST_RACE | _MISSING:
                    log.error("%s: lock %s was lost (broken by another holder)", self.who, full)
                    return
                log.warning("%s: cannot refresh lock %s: %s", self.who, full, _code(e))
            except BotoCoreError as e:
                log.warning("%s: cannot refresh lock %s: %s", self.who, full, e)

    def _release(self, name: str, full: str, holder: dict, etag: str) -> None:
        """Delete the lock only while it is still ours (If-Match our last ETag)."""
        if self._conditional:
            try:
                self._client().delete_object(Bucket=self.bucket, Key=full, IfMatch=etag)
                return
            except ClientError as e:
                code = _code(e)
                if code in _MISSING:
                    return
                if code in _LOST_RACE:
                    log.warning("%s: lock %s was broken by someone else while held", self.who, name)
                    return
                if code not in _UNSUPPORTED:
                    raise
        current = self._lock_state(full)  # no conditional delete here: check, then delete
        if current is not None and current[0].get("token") == holder["token"]:
            self._client().delete_object(Bucket=self.bucket, Key=full)
        else:
            log.warning("%s: lock %s was broken by someone else while held", self.who, name)

    # --- helpers -----------------------------------------------------------------
    def _client(self) -> Any:
        """Built on first use, so constructing a backend costs nothing; credentials come
        from the settings when given, else from boto3's usual chain (env, role, ...)."""
        with self._guard:
            if self._s3 is None:
                st = self.settings
                session = boto3.session.Session(
                    aws_access_key_id=st.access_key_id,
                    aws_secret_access_key=st.secret_access_key,
                    region_name=st.region or DEFAULT_REGION,
                )
                config = Config(
                    retries={"max_attempts": st.max_attempts, "mode": "standard"},
                    connect_timeout=st.connect_timeout,
                    read_timeout=st.read_timeout,
                    max_pool_connections=st.max_concurrency + 4,
                    # S3-compatible endpoints rarely serve bucket-named virtual hosts.
                    s3={"addressing_style": "path"} if st.endpoint_url else None,
                )
                self._s3 = session.client("s3", endpoint_url=st.endpoint_url, config=config)
            return self._s3

    def _full(self, key: str) -> str:
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._full(key)}" if key else f"s3://{self.bucket}"

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


class _Sent(BaseSubscriber):
    """Counts the bytes s3transfer's worker threads have sent."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        with self._lock:
            self.total += bytes_transferred


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _mask(url: str) -> str:
    """Drop any user:password from an endpoint URL before it reaches a message or log."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

