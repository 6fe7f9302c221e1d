"""The bare operations each job is compared with: the plain tools on the same bytes."""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import boto3
import libvirt
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from bench.host import fsync_path

MiB = 1 << 20


def copy_fsync(src: Path, dest: Path) -> None:
    """``cp --sparse=always`` and an fsync of the copy: what a full backup to NFS must at
    least cost."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    fsync_path(dest)


def push_backup(dom: libvirt.virDomain, disk: str, dest: Path, poll: float = 0.02) -> None:
    """A libvirt push-mode full backup of ``disk`` into ``dest`` (no checkpoint) and an
    fsync: the copy every push-mode design starts with, done as directly as possible."""
    xml = (f"<domainbackup mode='push'><disks><disk name={quoteattr(disk)} backup='yes' type='file'>"
           f"<driver type='qcow2'/><target file={quoteattr(str(dest))}/></disk></disks></domainbackup>")
    dom.backupBegin(xml, None, 0)
    while dom.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
        time.sleep(poll)
    done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)  # read and clear
    if done.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise RuntimeError(f"push-mode backup of {disk} failed: {done.get('errmsg', done)}")
    fsync_path(dest)


def rebuild(full: Path, incremental: Path, out: Path) -> None:
    """Full + incremental into one flat image, the way a restore must at least do it."""
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(full), "-F", "qcow2", str(incremental)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(incremental), str(out)], check=True)
    fsync_path(out)


def convert_live(image: Path, out: Path) -> None:
    """``qemu-img convert`` of the guest's live image (read shared) into a new qcow2, and an
    fsync: what writing the same data as a restored image must at least cost."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(out)], check=True)
    fsync_path(out)


def restore_from_dir(full: Path, incremental: Path, scratch: Path, out: Path) -> None:
    """Copy both artifacts from the repository to scratch space, then rebuild."""
    scratch.mkdir(parents=True, exist_ok=True)
    local = [scratch / "full.qcow2", scratch / "inc.qcow2"]
    for src, dest in zip((full, incremental), local, strict=True):
        subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    rebuild(local[0], local[1], out)


class BareS3:
    """A plain boto3 client with the product's part size and concurrency."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.bucket: str = settings["bucket"]
        self.client: Any = boto3.session.Session(
            aws_access_key_id=settings["access_key_id"],
            aws_secret_access_key=settings["secret_access_key"],
            region_name=settings["region"],
        ).client("s3", endpoint_url=settings["endpoint_url"],
                 config=Config(s3={"addressing_style": "path"},
                               max_pool_connections=max(settings["max_concurrency"],
                                                        settings["chunk_concurrency"]) + 4))
        self.concurrency: int = settings["max_concurrency"]
        self.chunk_concurrency: int = settings["chunk_concurrency"]
        part = settings["part_size_mib"] * MiB
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                       max_concurrency=settings["max_concurrency"],
                                       preferred_transfer_client="classic")

    def create_bucket(self) -> None:
        self.client.create_bucket(Bucket=self.bucket)

    def upload(self, src: Path, key: str) -> None:
        self.client.upload_file(str(src), self.bucket, key, Config=self.transfer)

    def get_streamed(self, key: str, dest: Path) -> None:
        """One plain GET of the whole object, written as it arrives."""
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        with open(dest, "wb") as f:
            for chunk in body.iter_chunks(4 * MiB):
                f.write(chunk)

    def restore(self, full_key: str, incremental_key: str, scratch: Path, out: Path, *, ranged: bool) -> None:
        """Download both artifacts to scratch space (``download_file``: parallel ranged GETs
        of part size; else one streamed GET each), then rebuild."""
        scratch.mkdir(parents=True, exist_ok=True)
        local = [scratch / "full.qcow2", scratch / "inc.qcow2"]
        for key, dest in zip((full_key, incremental_key), local, strict=True):
            if ranged:
                self.client.download_file(self.bucket, key, str(dest), Config=self.transfer)
            else:
                self.get_streamed(key, dest)
        rebuild(local[0], local[1], out)

    def download_parallel(self, objects: list[tuple[int, str]], out: Path) -> None:
        """GET every (offset, key) object on ``chunk_concurrency`` threads, each written at
        its offset in ``out`` as it arrives (a sealed chunk is a few bytes longer than its
        piece: the next one overwrites them), then fsync."""
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            def one(item: tuple[int, str]) -> None:
                offset, key = item
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                for piece in body.iter_chunks(MiB):
                    os.pwrite(fd, piece, offset)
                    offset += len(piece)

            with ThreadPoolExecutor(self.chunk_concurrency) as pool:
                for _ in pool.map(one, objects):
                    pass
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete_prefix(self, prefix: str = "") -> None:
        """Remove every object (and unfinished upload) under ``prefix``."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                   UploadId=upload["UploadId"])
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def delete_bucket(self) -> None:
        self.delete_prefix()
        self.client.delete_bucket(Bucket=self.bucket)
