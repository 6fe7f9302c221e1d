"""Running one job row: claim it, keep its lease fresh, call the job function, record
the outcome. Celery calls ``execute``; nothing here depends on Celery.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from catalog import jobs
from catalog.store import Catalog
from storage_backends import open_backend
from tasks.context import JobContext
from virtwarden.config import Config
from virtwarden.errors import Transient, VirtwardenError

log = logging.getLogger(__name__)

# Jobs that change a domain's disks or checkpoints: one at a time per domain.
DISK_CHANGING = {"backup", "snapshot", "restore-in-place", "migrate"}
# Jobs that work on a running domain where it runs: when it moved to another host
# after the job was queued, the job follows it (worker.submit.follow_domain).
FOLLOW_DOMAIN = {"backup", "snapshot"}


@dataclass(frozen=True)
class JobKind:
    """A job function and its request type, as "module:name" strings imported when a
    job of this kind runs."""

    run: str
    request: str
    needs_hypervisor: bool

    def load(self) -> tuple[Callable[[JobContext, Any], dict], type]:
        import importlib

        def get(ref: str) -> Any:
            module, name = ref.split(":")
            return getattr(importlib.import_module(module), name)

        return get(self.run), get(self.request)


KINDS: dict[str, JobKind] = {
    "backup": JobKind("tasks.backup:run_backup", "tasks.backup:BackupRequest", True),
    "restore": JobKind("tasks.restore:run_restore", "tasks.restore:RestoreRequest", False),
    "snapshot": JobKind("tasks.snapshots:run_snapshot", "tasks.snapshots:SnapshotRequest", True),
    "prune": JobKind("tasks.prune:run_prune", "tasks.prune:PruneRequest", False),
    "restore-as-domain": JobKind("tasks.restore_domain:run_restore_as_domain",
                                 "tasks.restore_domain:AsDomainRequest", True),
    "restore-in-place": JobKind("tasks.restore_domain:run_restore_in_place",
                                "tasks.restore_domain:InPlaceRequest", True),
    "drill": JobKind("tasks.drill:run_drill", "tasks.drill:DrillRequest", True),
    "verify": JobKind("tasks.verify:run_verify", "tasks.verify:VerifyRequest", False),
    # A runbook run is driven by the process that started it; a worker only ever sees
    # one whose process died (the reaper requeued it), and fails it saying so.
    "runbook": JobKind("worker.runbooks:orphaned", "worker.runbooks:RunbookRequest", False),
    "evacuate": JobKind("tasks.evacuate:run_evacuate", "tasks.evacuate:EvacuateRequest", True),
}


class LeaseLost(Exception):
    """Another worker took the job over; stop without recording anything."""


class Heartbeat:
    """Renews the job's lease in the background and carries its progress."""

    def __init__(self, cat: Catalog, job_id: str, owner: str, lease: float, every: float) -> None:
        self.cat, self.job_id, self.owner, self.lease, self.every = cat, job_id, owner, lease, every
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 5)

    def report(self, fraction: float, text: str) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost; another worker owns it now")
        self._progress = (fraction, text)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def beat(self) -> None:
        progress = self._progress
        try:
            ok = jobs.heartbeat(self.cat, self.job_id, self.owner, self.lease,
                                progress=progress[0] if progress else None,
                                text=progress[1] if progress else None)
        except VirtwardenError as e:  # database briefly unreachable: try again next beat
            log.warning("job %s: heartbeat failed: %s", self.job_id, e)
            return
        if not ok:
            self.lost.set()


def _job_function(kind: JobKind | None) -> tuple[Callable[[JobContext, Any], dict], type] | None:
    """The kind's job function and request type; None when this release lacks its module
    (a policy may already name a job, e.g. snapshot, that a later release brings)."""
    if kind is None:
        return None
    try:
        return kind.load()
    except ModuleNotFoundError as e:
        if e.name and kind.run.startswith(e.name + ":"):
            return None
        raise


def _failure(e: VirtwardenError) -> dict[str, Any]:
    """What a failed job keeps of its error besides the message: its kind and exit
    code, so ``--wait`` exits as the command would have had it run the job itself."""
    return {"error_type": type(e).__name__, "exit_code": e.exit_code}


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def execute(cfg: Config, job_id: str, *, cat: Catalog | None = None) -> str:
    """Run the job if we can claim it. Returns 'done', 'failed', 'skipped' (someone else
    has it or it finished), 'busy' (its domain is locked: try again later), 'retry'
    (a transient error: the job is queued again) or 'moved' (its domain runs on another
    host now: the job was sent to that host's queue)."""
    cat = cat or Catalog(cfg.catalog_url)
    job = jobs.get(cat, job_id)
    kind = KINDS.get(job.kind)
    owner = owner_id()
    claim = jobs.claim(cat, job_id, owner, cfg.worker.lease_seconds, lock_domain=job.kind in DISK_CHANGING)
    if not claim.ok:
        log.info("job %s: not started (%s)", job_id, claim.why)
        return "busy" if claim.why == "domain-busy" else "skipped"
    loaded = _job_function(kind)
    if kind is None or loaded is None:
        why = "is not part of this release yet" if kind else "is unknown"
        jobs.finish(cat, job_id, owner, ok=False, error=f"job kind {job.kind!r} {why}")
        return "failed"
    run, request = loaded
    beat = Heartbeat(cat, job_id, owner, cfg.worker.lease_seconds, cfg.worker.heartbeat_seconds)
    beat.start()
    hv = None
    try:
        host = job.host or next(iter(cfg.hosts))
        if kind.needs_hypervisor:
            from hypervisor.libvirt_host import LibvirtHost

            hv = LibvirtHost(host, cfg.host(host).uri).open()
        ctx = JobContext(
            job_id=job_id, catalog=cat, hypervisor=hv,
            storage=lambda name: open_backend(name, cfg.storage_target(name)),
            scratch_root=cfg.scratch_dir(host), report=beat.report, attempt=claim.attempt,
        )
        if hv is not None and job.kind in FOLLOW_DOMAIN and job.domain:
            from worker.submit import follow_domain

            if follow_domain(cfg, cat, job, owner, hv):
                return "moved"
        log.info("job %s: %s of %s, attempt %d", job_id, job.kind, job.domain, claim.attempt)
        result = run(ctx, request(**job.params))
    except LeaseLost as e:
        log.warning("%s", e)
        return "skipped"
    except Transient as e:
        if claim.attempt < job.max_attempts:
            log.warning("job %s: attempt %d failed, will retry: %s", job_id, claim.attempt, e)
            jobs.requeue(cat, job_id, owner, f"attempt {claim.attempt} failed: {e}")
            return "retry"
        jobs.finish(cat, job_id, owner, ok=False, error=str(e), result=_failure(e))
        return "failed"
    except VirtwardenError as e:
        log.error("job %s: failed: %s", job_id, e)
        jobs.finish(cat, job_id, owner, ok=False, error=str(e), result=_failure(e))
        return "failed"
    except Exception as e:  # noqa: BLE001 - a bug: record it, keep the worker alive
        log.exception("job %s: internal error", job_id)
        jobs.finish(cat, job_id, owner, ok=False, error=f"internal error (a bug, please report): {e!r}")
        return "failed"
    finally:
        beat.stop()
        if hv is not None:
            hv.close()
    jobs.finish(cat, job_id, owner, ok=True, result=result)
    log.info("job %s: succeeded", job_id)
    return "done"
