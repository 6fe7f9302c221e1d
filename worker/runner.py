"""Running one job row: claim it, keep its lease fresh, call the job function, record
the outcome. Celery calls ``execute``. Nothing here imports Celery, but a job whose
domain now runs on another host is sent on to that host's queue from here, through
``virtwarden.submit.follow_domain`` (which does).

An attempt holds the job only through its ``Fence`` (the token its claim set). The job
function gets a catalog whose every write is conditional on that token, a report
callback that stops the job once the lease is lost or could not be renewed in time,
and ``confirm_owner`` to call right before any step that changes something outside
the catalog (see catalog/fencing.py). A job that loses its lease stops where it is and
records nothing; its successor's recovery takes over what it left.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtwarden.catalog import jobs
from virtwarden.catalog.fencing import Fence
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor import connect
from virtwarden.hypervisor.types import Hypervisor
from virtwarden.storage_backends import open_backend
from virtwarden.storage_backends.format2.access import repositories
from virtwarden.tasks.context import JobContext

from virtwarden import faults
from virtwarden.config import Config
from virtwarden.errors import LeaseLost, Transient, VirtwardenError
from virtwarden.redact import mask

log = logging.getLogger(__name__)

# Jobs that change a domain's disks or checkpoints: one at a time per domain.
DISK_CHANGING = {"backup", "snapshot", "restore-in-place", "migrate"}
# Jobs that work on a running domain where it runs: when it moved to another host
# after the job was queued, the job follows it (virtwarden.submit.follow_domain).
FOLLOW_DOMAIN = {"backup", "snapshot"}


@dataclass(frozen=True)
class Outcome:
    """What an attempt came to, and what the Celery edge does next.

    ``state``: 'done', 'failed', 'skipped' (someone else has the job, it finished, it is
    for another host than the one whose queue delivered the message, or this attempt
    lost it), 'busy' (its domain is locked: deliver it again later), 'retry' (a
    transient error: the job is queued again, deliver it after ``retry_delay``) or
    'moved' (its domain runs on another host now: the job was re-routed, and ``send``
    is the job to send to that host's queue)."""

    state: str
    send: jobs.JobView | None = None


@dataclass(frozen=True)
class JobKind:
    """A job function and its request type, as "module:name" strings imported when a
    job of this kind runs; ``recover`` (optional) undoes what an unfinished attempt left
    and runs once more when the job gives up, before it is marked failed. What it
    returns (a sentence saying what it found and did, or None) is added to the error.
    ``ended`` (optional) runs once the outcome of the job's run or recovery is recorded,
    to remove what only a later attempt would have read."""

    run: str
    request: str
    needs_hypervisor: bool
    recover: str | None = None
    ended: str | None = None

    def load(self) -> tuple[Callable[[JobContext, Any], dict], type]:
        return _import(self.run), _import(self.request)

    def load_recovery(self) -> Callable[[JobContext, Any], str | None] | None:
        return _import(self.recover) if self.recover else None


def _import(ref: str) -> Any:
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


KINDS: dict[str, JobKind] = {
    "backup": JobKind("virtwarden.tasks.backup:run_backup", "virtwarden.tasks.backup:BackupRequest", True,
                      recover="virtwarden.tasks.recovery:recover_backup_job"),
    "restore": JobKind("virtwarden.tasks.restore:run_restore", "virtwarden.tasks.restore:RestoreRequest", False),
    "snapshot": JobKind("virtwarden.tasks.snapshots:run_snapshot", "virtwarden.tasks.snapshots:SnapshotRequest", True),
    "prune": JobKind("virtwarden.tasks.prune:run_prune", "virtwarden.tasks.prune:PruneRequest", False),
    "restore-as-domain": JobKind("virtwarden.tasks.restore_domain:run_restore_as_domain",
                                 "virtwarden.tasks.restore_domain:AsDomainRequest", True),
    "restore-in-place": JobKind("virtwarden.tasks.restore_domain:run_restore_in_place",
                                "virtwarden.tasks.restore_domain:InPlaceRequest", True,
                                recover="virtwarden.tasks.restore_domain:recover_in_place",
                                ended="virtwarden.tasks.restore_domain:forget_journal"),
    "drill": JobKind("virtwarden.tasks.drill:run_drill", "virtwarden.tasks.drill:DrillRequest", True),
    "verify": JobKind("virtwarden.tasks.verify:run_verify", "virtwarden.tasks.verify:VerifyRequest", False),
    # A runbook run is driven by the process that started it; a worker only ever sees
    # one whose process died (the reaper requeued it), and fails it saying so.
    "runbook": JobKind("virtwarden.runbooks:orphaned", "virtwarden.runbooks:RunbookRequest", False),
    "evacuate": JobKind("virtwarden.tasks.evacuate:run_evacuate", "virtwarden.tasks.evacuate:EvacuateRequest", True),
    "gc": JobKind("virtwarden.tasks.gc:run_gc", "virtwarden.tasks.gc:GcRequest", False),
}


def recoverable(kind: str) -> bool:
    """Whether a job of ``kind`` that gives up runs its recovery first (for ``jobs.reap``)."""
    known = KINDS.get(kind)
    return bool(known and known.recover)


class Heartbeat:
    """Renews the attempt's lease in the background, carries its progress, and stops the
    job (LeaseLost at its next report) once the lease is not ours any more: taken over,
    or not renewed for so long that it may have been (a worker paused or cut off from
    the database acts on nothing it can no longer prove it owns)."""

    def __init__(self, cat: Catalog, fence: Fence, every: float) -> None:
        self.cat, self.fence, self.every = cat, fence, every
        self.fenced = cat.fenced(fence)  # what the job writes through
        self.lost = threading.Event()
        self._renewed = time.monotonic()  # the claim has just set the lease
        self._stop = threading.Event()
        self._progress: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{fence.job_id[:8]}", daemon=True)

    @property
    def margin(self) -> float:
        """How long before the lease's end (by our clock) the job stops acting."""
        return max(self.fence.lease_seconds * 0.2, min(self.every, self.fence.lease_seconds / 2))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 5)

    def check(self) -> None:
        """LeaseLost when the lease is not (provably) ours any more."""
        if not self.lost.is_set() and time.monotonic() - self._renewed > self.fence.lease_seconds - self.margin:
            log.warning("job %s: lease not renewed for %.0fs; stopping before another worker may take over",
                        self.fence.job_id, time.monotonic() - self._renewed)
            self.lost.set()
        if self.lost.is_set():
            raise LeaseLost(f"job {self.fence.job_id}: lease lost; another worker owns it now or may take it")

    def report(self, fraction: float, text: str) -> None:
        self.check()
        self._progress = (fraction, text)

    def confirm(self, action: str) -> None:
        """Right before a step that changes something outside the catalog: prove with the
        database that the attempt still holds the job (which renews the lease)."""
        self.check()
        started = time.monotonic()
        try:
            self.fenced.check_owner(action)
        except LeaseLost:
            self.lost.set()
            raise
        self._renewed = max(self._renewed, started)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def beat(self) -> None:
        progress = self._progress
        started = time.monotonic()
        try:
            with faults.background_write():
                ok = jobs.heartbeat(self.cat, self.fence, progress=progress[0] if progress else None,
                                    text=progress[1] if progress else None)
        except VirtwardenError as e:  # database briefly unreachable: try again next beat
            log.warning("job %s: heartbeat failed: %s", self.fence.job_id, e)
            return
        if ok:
            self._renewed = max(self._renewed, started)
        else:
            self.lost.set()


def _failure(e: VirtwardenError) -> dict[str, Any]:
    """What a failed job keeps of its error besides the message: its kind and exit
    code, so ``--wait`` exits as the command would have had it run the job itself."""
    return {"error_type": type(e).__name__, "exit_code": e.exit_code}


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def retry_delay(cfg: Config, attempt: int) -> float:
    """How long a job waits before its next attempt after a transient failure."""
    return min(cfg.worker.retry_delay_seconds * attempt, 600.0)


def execute(cfg: Config, job_id: str, *, cat: Catalog | None = None, via_host: str | None = None) -> Outcome:
    """Run the job if we can claim it (see ``Outcome`` for what can come of it)."""
    cat = cat or Catalog(cfg.catalog_url)
    job = jobs.get(cat, job_id)
    kind = KINDS.get(job.kind)
    owner = owner_id()
    claim = jobs.claim(cat, job_id, owner, cfg.worker.lease_seconds, lock_domain=job.kind in DISK_CHANGING,
                       host=via_host)
    if not claim.ok or claim.fence is None:
        log.info("job %s: not started (%s)", job_id, claim.why)
        return Outcome("busy" if claim.why == "domain-busy" else "skipped")
    fence = claim.fence
    if kind is None:
        jobs.finish(cat, fence, ok=False, error=f"job kind {job.kind!r} is unknown")
        return Outcome("failed")
    run, request_type = kind.load()
    beat = Heartbeat(cat, fence, cfg.worker.heartbeat_seconds)
    beat.start()
    hv = None
    ctx: JobContext | None = None
    try:
        host = job.host or next(iter(cfg.hosts))
        if kind.needs_hypervisor:
            hv = connect(host, cfg.host(host).uri).open()
        ctx = JobContext(
            job_id=job_id, catalog=beat.fenced, hypervisor=hv, connect=connect,
            storage=lambda name: open_backend(name, cfg.storage_target(name)),
            repository=functools.cache(repositories(cfg)),  # the key unlocked once per job and storage
            scratch_root=cfg.scratch_dir(host), report=beat.report, attempt=claim.attempt,
            token=fence.token, confirm_owner=beat.confirm, restore_roots=cfg.restore_roots,
            agent=cfg.agent, drill=cfg.drill,
        )
        if claim.give_up is not None:
            return Outcome(_give_up(cat, ctx, kind, request_type, job, claim.give_up))
        if hv is not None and job.kind in FOLLOW_DOMAIN and job.domain:
            followed = _follow_domain(cfg, cat, job, fence, hv)
            if followed is not None:
                return followed
        log.info("job %s: %s of %s, attempt %d (token %d)", job_id, job.kind, job.domain, claim.attempt, fence.token)
        result = run(ctx, request_type(**job.params))
        beat.check()
    except LeaseLost as e:
        log.warning("%s", e)
        return Outcome("skipped")
    except Transient as e:
        if claim.attempt < job.max_attempts:
            log.warning("job %s: attempt %d failed, will retry: %s", job_id, claim.attempt, e)
            if jobs.requeue(cat, fence, mask(f"attempt {claim.attempt} failed: {e}"),
                            delay=retry_delay(cfg, claim.attempt), resend_after=cfg.worker.resend_seconds):
                return Outcome("retry")
            return Outcome("skipped")
        return Outcome(_ended_failed(kind, ctx, _failed(cat, fence, str(e), _failure(e))))
    except VirtwardenError as e:
        log.error("job %s: failed: %s", job_id, e)
        result = {**_failure(e), **(getattr(e, "result", None) or {})}
        return Outcome(_ended_failed(kind, ctx, _failed(cat, fence, str(e), result)))
    except Exception as e:  # a bug: record it, keep the worker alive
        log.exception("job %s: internal error", job_id)
        return Outcome(_ended_failed(kind, ctx, _failed(cat, fence, f"internal error (a bug, please report): {e!r}")))
    finally:
        beat.stop()
        if hv is not None:
            hv.close()
    if not jobs.finish(cat, fence, ok=True, result=result):
        log.warning("job %s: finished, but another worker owns the job now; its outcome is not recorded", job_id)
        return Outcome("skipped")
    log.info("job %s: succeeded", job_id)
    _ended(kind, ctx)
    return Outcome("done")


def _follow_domain(cfg: Config, cat: Catalog, job: jobs.JobView, fence: Fence, hv: Hypervisor) -> Outcome | None:
    """A claimed job whose domain is not on the job's host (``hv``) any more: re-route
    it to the host where the domain runs now ('moved', with the job to send there);
    None when the domain is here. DomainNotFound (the job then fails saying so) when no
    configured host has it."""
    from virtwarden.hypervisor import domains
    from virtwarden.hypervisor.locate import find_host

    assert job.domain is not None
    if domains.exists(hv, job.domain):
        return None
    host, _ = find_host(cfg, job.domain)
    why = f"domain {job.domain} left host {hv.name}: re-routed to {host}"
    moved = jobs.move(cat, fence, host, why, resend_after=cfg.worker.resend_seconds)
    if moved is None:
        return Outcome("skipped")
    log.info("job %s: %s", job.id, why)
    return Outcome("moved", send=moved)


def _ended_failed(kind: JobKind, ctx: JobContext | None, outcome: str) -> str:
    if outcome == "failed" and ctx is not None:
        _ended(kind, ctx)
    return outcome


def _ended(kind: JobKind, ctx: JobContext) -> None:
    """The job's outcome is recorded, so no attempt follows: remove the scratch space of
    every attempt (a killed one leaves its copy behind), and let its kind tidy up."""
    ctx.clear_stale_scratch()
    ctx.clear_scratch()
    if kind.ended is None:
        return
    try:
        _import(kind.ended)(ctx)
    except Exception as e:  # noqa: BLE001 - the outcome stands; what is left is tidied later
        log.warning("job %s: tidying up after the job ended failed: %s", ctx.job_id, e)


def _failed(cat: Catalog, fence: Fence, error: str, result: dict[str, Any] | None = None) -> str:
    # The error is shown by `virtwarden job`, the API and the logs: no URL's password in it.
    return "failed" if jobs.finish(cat, fence, ok=False, error=mask(error), result=result) else "skipped"


def _give_up(cat: Catalog, ctx: JobContext, kind: JobKind, request: type, job: jobs.JobView, error: str) -> str:
    """The job's last attempt was lost: run its recovery (undo or finish what it left on
    the domain and in storage), then record the failure."""
    recover = kind.load_recovery()
    if recover is not None:
        log.warning("job %s: giving up (%s); running the recovery of %s of %s", job.id, error, job.kind, job.domain)
        try:
            note = recover(ctx, request(**job.params))
        except VirtwardenError as e:
            error = f"{error}; its recovery failed too: {e}"
        else:
            error = f"{error}; {note}" if note else error
    assert ctx.catalog.fence is not None
    outcome = _failed(cat, ctx.catalog.fence, error)
    if outcome == "failed":
        _ended(kind, ctx)
    return outcome
