"""An S3 endpoint for tests, as pytest fixtures (listed in the main conftest's
``pytest_plugins``).

``s3_endpoint`` uses $VIRTWARDEN_TEST_S3_ENDPOINT (default http://127.0.0.1:9900, where
compose's MinIO or a developer's server may listen); when nothing answers there it
starts ``moto_server`` for the session. Without either, S3 tests skip locally and fail in
CI (see ``tests.conftest.need``). Credentials live in the settings each test gets, never
in ~/.aws, so a developer's own AWS profile cannot leak in or be touched.
"""
from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from tests.conftest import need
from virtwarden.config import S3Storage

DEFAULT_ENDPOINT = "http://127.0.0.1:9900"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
START_TIMEOUT = 30.0


def answers(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.cache
def s3_client(endpoint: str):
    """A plain boto3 client for fixtures and fault injection (bypasses the backend); one
    per endpoint and process (a client costs about 0.1 s of a core; it is thread-safe)."""
    return boto3.session.Session(region_name="us-east-1", **CREDENTIALS).client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    url = os.environ.get("VIRTWARDEN_TEST_S3_ENDPOINT") or DEFAULT_ENDPOINT
    if answers(url):
        yield url
        return
    binary = shutil.which("moto_server")
    if binary is None:
        need(False, f"no S3 endpoint answers at {url} and moto_server is not installed (pip install 'moto[server]')")
    assert binary is not None
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not answers(url, 0.2):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    need(False, f"moto_server did not start: {log.read().decode(errors='replace')[-500:]}")
                time.sleep(0.1)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def s3_settings(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    """A fresh bucket per test, emptied and removed afterwards. 5 MiB parts (S3's
    minimum) so that a file of a few MiB already goes through multipart."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = f"vw-test-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    yield S3Storage(
        type="s3",
        bucket=bucket,
        prefix="backups",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        access_key_id=CREDENTIALS["aws_access_key_id"],
        secret_access_key=CREDENTIALS["aws_secret_access_key"],
        part_size_mib=5,
        max_concurrency=3,
        max_attempts=3,
        connect_timeout=5,
        read_timeout=30,
    )
    empty_bucket(client, bucket)
    client.delete_bucket(Bucket=bucket)


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
