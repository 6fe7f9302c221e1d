"""A throwaway virtwarden installation driven as an operator would: a configuration file,
a real ``virtwarden worker`` process and the ``virtwarden`` command line."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import yaml

from bench.memory import PeakRss

REPO = Path(__file__).resolve().parent.parent
READY = b" ready."
VAULT_S3_PREFIX = "vault"  # target vault-s3: format 2 in the s3 target's bucket, under this prefix


@dataclass(frozen=True)
class JobRun:
    """One job as the CLI and the catalog saw it."""

    cli_seconds: float  # the whole ``virtwarden ... --wait`` command, process start to exit
    job_seconds: float  # the job row: created (submitted) to finished (succeeded)
    idle_rss: int  # the worker tree's resident memory just before the command
    peak_rss: int  # its largest resident memory while the command ran
    job: dict[str, Any]


class Installation:
    def __init__(self, root: Path, *, host: str, broker_url: str, s3: dict[str, Any],
                 scratch: Path | None = None) -> None:
        self.root = root
        self.scratch = scratch  # the host's scratch_dir (short: a pull-mode backup's NBD socket lives there)
        self.host = host
        self.broker_url = broker_url
        self.repository = root / "repository"
        self.vault = root / "vault"  # the format-2 target: a local directory, encrypted
        self.config_path = root / "virtwarden.yaml"
        self.log_path = root / "worker.log"
        self.s3 = s3
        self._worker: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        doc = {
            "data_dir": str(self.root / "data"),
            "broker_url": self.broker_url,
            "hosts": {self.host: {"uri": "qemu:///system",
                                  **({"scratch_dir": str(self.scratch)} if self.scratch else {})}},
            "storage": {"nfs": {"type": "nfs", "path": str(self.repository)}, "s3": self.s3,
                        "vault": {"type": "nfs", "path": str(self.vault), "create": True, "format": 2,
                                  "key_file": str(self.root / "vault.key"),
                                  "passphrase_file": str(self.root / "vault.pass")},
                        # format 2 on S3: the same bucket as s3, its own prefix and key
                        "vault-s3": {**self.s3, "prefix": VAULT_S3_PREFIX, "format": 2,
                                     "key_file": str(self.root / "vault-s3.key"),
                                     "passphrase_file": str(self.root / "vault.pass")}},
            "worker": {"concurrency": 1},
        }
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        passphrase = self.root / "vault.pass"
        if not passphrase.exists():
            passphrase.write_text(secrets.token_hex(16) + "\n")
            passphrase.chmod(0o600)

    def init_vault(self, target: str = "vault") -> None:
        """Create the format-2 repository of ``target`` and its key (``key init``)."""
        self.cli("key", "init", target)

    def open_vault(self, target: str = "vault") -> Any:
        """The format-2 repository of ``target``, opened as the product opens it."""
        from virtwarden.storage_backends.format2.access import open_repository

        from virtwarden import config

        return open_repository(target, config.load(str(self.config_path), env={}).storage_target(target))

    def empty_vault(self, target: str = "vault") -> None:
        """Delete every point of ``target`` (a format-2 target) and gc its chunks: the next
        full starts from an empty repository, as the other targets' new chains do."""
        repo = self.open_vault(target)
        for ref in list(repo.points()):
            repo.delete_point(ref)
        report = repo.gc()
        if report.deferred:
            raise RuntimeError(f"gc of the bench's {target} deferred: {report.deferred}")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("VIRTWARDEN_DATABASE_URL", "VIRTWARDEN_BROKER_URL") and not k.startswith("AWS_")}
        env.update(VIRTWARDEN_CONFIG=str(self.config_path), AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env

    # --- worker ------------------------------------------------------------------
    def start_worker(self, timeout: float = 60) -> int:
        args = [sys.executable, "-m", "virtwarden.cli", "--log-level", "info", "worker", "--host", self.host]
        with open(self.log_path, "ab") as log:
            self._worker = subprocess.Popen(args, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while READY not in self.log_path.read_bytes():
            if self._worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.worker_log_tail()}")
            time.sleep(0.2)
        return self._worker.pid

    def worker_log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop_worker(self) -> None:
        """TERM the worker's process group (it runs in a session of its own), KILL after 30 s."""
        proc, self._worker = self._worker, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def forget_queue(self) -> None:
        """Remove this installation's keys (its host queue) from the broker database, and
        kombu's bookkeeping keys once nothing else is left there."""
        client = redis.Redis.from_url(self.broker_url)
        for key in client.scan_iter(match=f"*host.{self.host}*"):
            client.delete(key)
        rest = [k.decode() for k in client.scan_iter()]
        if all(k.startswith(("_kombu.", "unacked")) for k in rest):
            for key in rest:
                client.delete(key)

    # --- commands ----------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "virtwarden.cli", *args], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"virtwarden {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
                               f"\nworker log:\n{self.worker_log_tail()}")
        return proc

    def run_job(self, *args: str) -> JobRun:
        """``virtwarden ARGS --wait --json`` while sampling the worker's memory."""
        assert self._worker is not None, "start_worker() first"
        with PeakRss(self._worker.pid) as peak:
            start = time.monotonic()
            proc = self.cli(*args, "--wait", "--json")
            cli_seconds = time.monotonic() - start
        job = json.loads(proc.stdout)
        if job["state"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
        took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])
        return JobRun(cli_seconds, took.total_seconds(), peak.before, peak.bytes, job)

    def points(self, domain: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("backups", domain, "--json").stdout))
