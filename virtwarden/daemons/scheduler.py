"""The scheduler daemon (``virtwarden scheduler``) and ``virtwarden schedule preview``.

It starts the scheduled jobs of every policy section that has a ``schedule``:
backups, snapshots, drills and verifications (policies.schedule.SCHEDULED_JOBS).

Every tick (``scheduler.tick_seconds`` in the configuration) it reads the policies,
lists the domains of every configured host, finds the slots that came due since the
last tick (policies.schedule.due), claims each one by inserting its row
(catalog.slots), and decides for every undecided row: start (a job row and a message,
through virtwarden.submit.enqueue with the slot as dedup key), skip (its window closed) or
defer (a concurrency limit; tried again next tick while the window is open).

Any number of schedulers may run at once: the unique slot row and the guarded state
changes in the catalog, not memory, decide who starts a slot, and the dedup key makes
a second job for one slot impossible. On start, slots since the newest recorded slot
row (at most ``MAX_CATCH_UP`` back) are looked at, so a slot missed while no scheduler
ran still starts if its window is open and is recorded as skipped otherwise; on a
catalog that has no slot rows yet, each schedule's latest slot is looked at.

Time comes from a ``clock`` callable so tests control it; ``$VIRTWARDEN_SCHEDULER_NOW``
(an ISO time) starts the clock of a real process at that time, for tests and rehearsals.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from virtwarden.catalog import jobs, slots
from virtwarden.catalog.services import Presence
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config, load_for_process
from virtwarden.daemons.connections import KeptConnections
from virtwarden.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, DomainNotFound, PolicyError, Transient, VirtwardenError
from virtwarden.hypervisor import Hypervisor
from virtwarden.policies import DomainFacts, Policy, load_policies, parse_metadata
from virtwarden.policies.loader import held
from virtwarden.policies.schedule import (
    SCHEDULED_JOBS,
    Busy,
    Slot,
    any_due,
    between,
    due,
    limits_of,
    schedule_of,
    split,
)

if TYPE_CHECKING:
    from virtwarden.worker import celery_app

log = logging.getLogger(__name__)

ENV_NOW = "VIRTWARDEN_SCHEDULER_NOW"
# How far back a starting scheduler looks for slots it missed.
MAX_CATCH_UP = timedelta(days=7)
BATCH = 500  # slots claimed, or started with their jobs, per transaction
# A domain undefined while a host is listed makes the listing fail; list again.
LIST_ATTEMPTS = 3
PREVIEW_SPAN = timedelta(hours=24)

Clock = Callable[[], datetime]
Domains = dict[str, list[DomainFacts]]


def system_clock() -> datetime:
    return datetime.now(UTC)


def clock_from_env(env: dict[str, str] | None = None) -> Clock:
    """The system clock, or one that starts at ``$VIRTWARDEN_SCHEDULER_NOW`` and runs."""
    text = (os.environ if env is None else env).get(ENV_NOW)
    if not text:
        return system_clock
    start, began = parse_time(text, ENV_NOW), system_clock()
    return lambda: start + (system_clock() - began)


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an ISO time (e.g. 2025-03-30T00:00Z)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def list_domains(cfg: Config) -> tuple[Domains, dict[str, str]]:
    """The domains of every configured host, and why each unreachable host was left out
    (a one-off listing: each host's connection is closed again)."""
    lister = HostLister(cfg)
    try:
        return lister.domains()
    finally:
        lister.close()


class HostLister:
    """Lists the domains of every configured host, tick after tick, over a connection per
    host kept open in between (daemons.connections: a lost one is replaced within the
    same tick). Up to ``scheduler.hosts_in_parallel`` hosts are listed at once (libvirt's
    calls wait on the network without holding the interpreter), so a tick costs about
    its slowest hosts' round trips, not their sum. A host that fails is left out of the
    tick with the reason."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.connections = KeptConnections(cfg)
        # Hosts whose listing has not come back (a hung libvirtd): since when. Their
        # thread is left waiting; they are left out until it returns.
        self._stuck: dict[str, float] = {}
        self._stuck_guard = threading.Lock()

    def domains(self, only: list[str] | None = None, *, metadata: bool = True) -> tuple[Domains, dict[str, str]]:
        """The domains of every configured host (``only``: of these), and why each host
        that failed was left out. Without ``metadata`` (no policy selects by it) only
        their names are asked for: one call per host instead of several per domain.

        A host gets ``scheduler.host_timeout_seconds`` from the start of the listing: one
        that has not answered by then (libvirt has no timeout of its own: a stopped or
        hung libvirtd keeps a call waiting for ever) is left out of the tick with the
        reason, so the other hosts' slots start on time; its listing thread runs on in
        the background, and the host is left out of later ticks until it returns."""
        names = list(self.cfg.hosts) if only is None else only
        found: Domains = {}
        failed: dict[str, str] = {}
        now = time.monotonic()
        with self._stuck_guard:
            stuck = dict(self._stuck)
        for name in names:
            if name in stuck:
                failed[name] = (f"its listing of {now - stuck[name]:.0f} s ago has not come back yet (libvirtd "
                                "hung?); left out until it does")
        todo = [n for n in names if n not in stuck]
        results: dict[str, tuple[list[DomainFacts] | None, str | None]] = {}
        queue = list(reversed(todo))  # taken from the end: in the configured order
        done = threading.Condition()

        def lister() -> None:
            while True:
                with done:
                    if not queue:
                        return
                    name = queue.pop()
                facts, error = self._one(name, metadata)
                with done:
                    results[name] = (facts, error)
                    done.notify_all()
                with self._stuck_guard:
                    self._stuck.pop(name, None)

        # Daemon threads: one stuck in libvirt never holds up a tick or the exit; the
        # others take the rest of the hosts.
        for i in range(max(1, min(self.cfg.scheduler.hosts_in_parallel, len(todo)))):
            threading.Thread(target=lister, name=f"list-{i}", daemon=True).start()
        timeout = self.cfg.scheduler.host_timeout_seconds
        deadline = now + timeout
        with done:
            while len(results) < len(todo) and time.monotonic() < deadline:
                done.wait(deadline - time.monotonic())
            unstarted = set(queue)  # every thread was held by a host that does not answer
            queue.clear()
            late = [n for n in todo if n not in results and n not in unstarted]
            with self._stuck_guard:
                self._stuck.update(dict.fromkeys(late, now))
            answered = dict(results)
        for name in late:
            failed[name] = f"did not answer within {timeout:g} s (libvirtd hung?); left out of this tick"
        for name in unstarted:
            failed[name] = (f"not listed within {timeout:g} s: every listing thread was waiting for a host that "
                            "does not answer")
        for name, (facts, error) in answered.items():
            if facts is not None:
                found[name] = facts
            else:
                failed[name] = error or "unknown error"
        return found, failed

    def close(self) -> None:
        self.connections.close()

    def _one(self, name: str, metadata: bool) -> tuple[list[DomainFacts] | None, str | None]:
        try:
            return self.connections.use(name, lambda hv: _domains_of(name, hv, metadata)), None
        except VirtwardenError as e:
            return None, str(e)


def _selects_by_metadata(policies: list[Policy]) -> bool:
    """Whether some policy's selector reads domains' metadata (then listing a host reads
    every domain's XML; otherwise the names are all a tick needs)."""
    return any(p.spec.selector.metadata for p in policies)


def _domains_of(name: str, hv: Hypervisor, metadata: bool = True) -> list[DomainFacts]:
    if not metadata:
        return [DomainFacts(domain, name) for domain in hv.domain_names()]
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            return [DomainFacts(d.name, name, parse_metadata(d.xml)) for d in hv.domains(sizes=False)]
        except DomainNotFound:
            if attempt == LIST_ATTEMPTS:
                raise
    return []


@dataclass
class TickReport:
    at: datetime
    started: list[tuple[str, str]] = field(default_factory=list)  # (slot key, job id)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (slot key, reason)
    deferred: list[tuple[str, str]] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    resent: list[str] = field(default_factory=list)  # queued jobs whose message the sweeper sent
    # Configuration problems: policy files that do not load, policies that tie.
    problems: list[str] = field(default_factory=list)
    quiet: bool = False  # nothing was due on the hosts listed before: they were not listed
    retried: list[str] = field(default_factory=list)  # in a quiet tick: hosts that had not answered, tried

    @property
    def ok(self) -> bool:
        return not self.unreachable and not self.problems

    def summary(self) -> str:
        text = (f"scheduler tick at {self.at.isoformat()}: {len(self.started)} started, {len(self.skipped)} skipped,"
                f" {len(self.deferred)} deferred")
        if self.quiet:
            text += (f" (nothing due: only {len(self.retried)} host(s) that had not answered listed)"
                     if self.retried else " (nothing due: no host listed)")
        if self.resent:
            text += f", {len(self.resent)} queued job(s) sent again"
        text += "".join(f"; host {h} unreachable: {why}" for h, why in self.unreachable.items())
        return text + "".join(f"; {p}" for p in self.problems)


class Scheduler:
    """One scheduler: ``tick`` does one pass; ``run`` ticks until stopped."""

    def __init__(self, cfg: Config, cat: Catalog, *, clock: Clock = system_clock) -> None:
        from virtwarden.worker import celery_app
        from virtwarden.worker.outbox import Sweeper

        self.cfg, self.cat, self.clock = cfg, cat, clock
        self.sweeper = Sweeper(cfg, cat, celery_app.send)
        self.hosts = HostLister(cfg)
        self._since: dict[str, datetime] = {}  # per host: the last tick that listed it
        # The hosts listed by the last full tick, and since then by quiet ticks' listings
        # of the others: their _since is current. The rest did not answer.
        self._current: set[str] = set()
        self._first_since: datetime | None = None
        self._started_up = False
        self._policies: list[Policy] = []
        self._policies_current = False  # False while the policy files do not load
        self._problems: set[str] = set()
        self._sender: celery_app.Publisher | None = None

    def run(self, stop: threading.Event, every: float) -> None:
        while True:
            try:
                log.info("%s", self.tick().summary())
            except VirtwardenError as e:
                log.error("scheduler tick failed (the next tick covers this one's slots): %s", e)
            except Exception:  # the daemon outlives a bug in one tick
                log.exception("scheduler tick failed with an unexpected error (a bug)")
            if stop.wait(every):
                self.close()
                return

    def close(self) -> None:
        self.hosts.close()
        if self._sender is not None:
            self._sender.close()

    def _publisher(self) -> celery_app.Publisher:
        """The process that sends a tick's messages when it has more than a batch of them
        (``celery_app.Publisher``): started by the first such tick, kept for the next."""
        from virtwarden.worker import celery_app

        if self._sender is None:
            self._sender = celery_app.Publisher(self.cfg)
        return self._sender

    def tick(self) -> TickReport:
        with held():  # one reading of the policy files for the whole tick
            return self._tick()

    def _tick(self) -> TickReport:
        now = self.clock()
        report = TickReport(now)
        policies = self._load_policies(report)
        only = None
        if self._nothing_due(policies, now):
            # No schedule has an instant since the hosts were last listed, and no slot
            # waits: they are not listed again (a quiet tick costs per schedule, not per
            # domain). Hosts that were not listed then (unreachable) are tried alone, so
            # that their slots start as soon as they answer again.
            report.quiet = True
            self._since.update(dict.fromkeys(self._current, now))
            only = report.retried = sorted(set(self.cfg.hosts) - self._current)
            if not only:
                report.resent = self.sweeper.sweep().resent
                return report
        domains, report.unreachable = self.hosts.domains(only, metadata=_selects_by_metadata(policies))
        for host, why in report.unreachable.items():
            log.warning("host %s left out of this tick: %s", host, why)
        self._finish_unsent(domains)
        self._claim(self._due(policies, domains, now, report), now)
        self._decide(policies, domains, now, report)
        sweep = self.sweeper.sweep()  # jobs of dead workers, and messages a broker lost
        report.resent = sweep.resent
        self._since.update({host: now for host in domains})
        self._current = set(domains) if only is None else self._current | set(domains)
        return report

    def _nothing_due(self, policies: list[Policy], now: datetime) -> bool:
        """True when listing the hosts listed last time would find nothing: no schedule
        has a slot since then, and no slot row waits for a decision or for its job."""
        if not self._started_up or not self._current:
            return False
        earliest = max(min(min(self._since[h] for h in self._current), now), now - MAX_CATCH_UP)
        return not any_due(policies, earliest, now) and not slots.waiting(self.cat)

    # --- finding and claiming slots ----------------------------------------------------
    def _load_policies(self, report: TickReport) -> list[Policy]:
        """The policies now; on a policy error, the last good ones, with the error logged:
        slots are still found and recorded, and those whose job needs the policy files
        (a backup's settings) wait, deferred, until the files are fixed."""
        try:
            self._policies = load_policies(self.cfg)
            self._policies_current = True
        except PolicyError as e:
            self._policies_current = False
            report.problems.append(str(e))
            log.error("policy directory %s has errors; scheduling with the %d policies read before: %s",
                      self.cfg.policies_path, len(self._policies), e)
        return self._policies

    def _due(self, policies: list[Policy], domains: Domains, now: datetime, report: TickReport) -> list[Slot]:
        if not self._started_up:
            last = slots.last_recorded(self.cat)
            self._first_since = None if last is None else max(min(last, now), now - MAX_CATCH_UP)
            self._started_up = True
        problems: list[str] = []
        found = []
        by_since: dict[datetime | None, Domains] = {}  # hosts listed at the last tick share one
        for host, facts in domains.items():
            since = self._since.get(host, self._first_since)
            since = None if since is None else max(min(since, now), now - MAX_CATCH_UP)
            by_since.setdefault(since, {})[host] = facts
        for since, hosts in by_since.items():  # cron slots are worked out once per group
            found += due(policies, hosts, now, since, problems=problems)
        found.sort(key=lambda s: (s.at, s.policy, s.job, s.domain))
        self._log_problems(problems)
        report.problems += sorted(set(problems))
        return found

    def _log_problems(self, problems: list[str]) -> None:
        for text in sorted(set(problems) - self._problems):
            log.error("not scheduled: %s", text)
        self._problems = set(problems)

    def _claim(self, due_slots: list[Slot], now: datetime) -> None:
        if not due_slots:
            return
        known = slots.recorded(self.cat, min(s.at for s in due_slots))
        new = {(s.policy, s.job, s.domain, s.at): s for s in due_slots}
        rows = [slots.NewSlot(*k, s.window_end) for k, s in new.items() if k not in known]
        for i in range(0, len(rows), BATCH):  # one transaction per batch
            for n in slots.claim_many(self.cat, rows[i:i + BATCH], now):
                s = new[(n.policy, n.job, n.domain, n.slot_at)]
                log.info("slot %s claimed (window until %s)", s.key, s.window_end.isoformat())

    # --- deciding ------------------------------------------------------------------------
    def _decide(self, policies: list[Policy], domains: Domains, now: datetime, report: TickReport) -> None:
        rows = slots.deferred(self.cat)
        if not rows:
            return
        hosts = {f.name: host for host, facts in domains.items() for f in facts}
        # While the policy files do not load, a policy missing from the last good set
        # may be the one being edited: its slots wait instead of being skipped.
        names = {p.name for p in policies} if self._policies_current else {r.policy for r in rows}
        candidates: dict[str, tuple[slots.SlotRow, Slot]] = {}
        for row in rows:
            slot = Slot(row.policy, row.job, row.domain, row.slot_at, row.window_end, hosts.get(row.domain))
            why = None if row.policy in names else f"policy {row.policy} no longer exists"
            if why is None and slot.host is None and now < slot.window_end:
                why = f"domain {row.domain} is not on any reachable host"
            if why is not None:
                self._record(row, slot, "skip" if row.policy not in names else "defer", why, report)
            else:
                candidates[slot.key] = (row, slot)
        busy = [Busy(j.kind, j.host, j.params.get("policy"), j.domain)
                for j in slots.busy_jobs(self.cat, SCHEDULED_JOBS)]
        plan = split([s for _, s in candidates.values()], now, busy, limits_of(policies))
        # A broker outage delays jobs, it never drops them: the slots start and their
        # jobs stay queued until the sweeper can send them (worker/outbox.py).
        send = self._broker_problem() is None if plan.start else True
        sends = _Sends(self.cfg, self.cat, self._publisher() if len(plan.start) > BATCH else None) \
            if send and plan.start else None
        try:
            for i in range(0, len(plan.start), BATCH):
                self._start_batch([(candidates[s.key][0], s) for s in plan.start[i:i + BATCH]], report, sends=sends)
        finally:
            if sends is not None:
                sends.close()
        for d in plan.skip:
            row = candidates[d.slot.key][0]
            # A new row whose window closed already was missed (no scheduler ran, or its
            # host was unreachable); a deferred one waited in vain.
            why = (f"missed while no scheduler saw it: {d.reason}" if row.reason == slots.NEW
                   else f"{d.reason} (it waited: {row.reason})")
            self._record(row, d.slot, "skip", why, report)
        for d in plan.defer:
            self._record(candidates[d.slot.key][0], d.slot, "defer", d.reason or "", report)

    def _record(self, row: slots.SlotRow, slot: Slot, action: str, why: str, report: TickReport) -> None:
        if action == "skip":
            cause = "missed" if row.reason == slots.NEW else "waited"
            if slots.move(self.cat, row.id, from_state=slots.DEFERRED, to_state=slots.SKIPPED, reason=why,
                          cause=cause):
                log.warning("slot %s skipped: %s", slot.key, why)
                report.skipped.append((slot.key, why))
        elif slots.move(self.cat, row.id, from_state=slots.DEFERRED, to_state=slots.DEFERRED, reason=why):
            if why != row.reason:
                log.info("slot %s deferred: %s", slot.key, why)
            report.deferred.append((slot.key, why))

    def _broker_problem(self) -> str | None:
        from virtwarden.worker import celery_app

        try:
            celery_app.check_broker(self.cfg)
        except VirtwardenError as e:
            log.warning("not starting slots this tick: %s", e)
            return f"broker unreachable: {e}"
        return None

    # --- starting --------------------------------------------------------------------------
    def _start_batch(self, batch: list[tuple[slots.SlotRow, Slot]], report: TickReport, *,
                     sends: _Sends | None) -> None:
        """Start a batch of deferred slots: their jobs' parameters settled first (a slot
        whose policy cannot say them now waits, or is skipped when it never will), then
        every slot moved to started, its job created and recorded in one transaction (a
        slot another scheduler started first is left to it), then the messages handed to
        ``sends`` (None: the broker is down, the jobs wait for the outbox). A send that
        fails leaves its job and the rest queued and due: the sweeper sends them when the
        broker is back."""
        starts: list[slots.Start] = []
        for row, slot in batch:
            assert slot.host is not None
            try:
                params = self._params(slot)
            except (Transient, PolicyError) as e:  # a policy file being edited is fixed soon, too
                log.error("slot %s: the job could not be created: %s", slot.key, e)
                self._record(row, slot, "defer", f"the job could not be created: {e}", report)
                continue
            except VirtwardenError as e:
                self._record(row, slot, "skip", f"the job could not be created: {e}", report)
                continue
            starts.append(slots.Start(row.id, slot.job, slot.domain, slot.host, params, slot.key))
        started = slots.start_many(self.cat, starts, max_attempts=self.cfg.worker.max_attempts,
                                   requested_by="scheduler",
                                   resend_after=self.cfg.worker.resend_seconds if sends is not None else 0)
        for st, job, _ in started:
            log.info("slot %s: job %s queued (%s of %s on host %s)", st.dedup_key, job.id, job.kind, job.domain,
                     job.host)
            report.started.append((st.dedup_key, job.id))
        if sends is not None:
            sends.put([job for _, job, created in started if created])

    def _finish_unsent(self, domains: Domains) -> None:
        """Create the jobs of started rows whose scheduler stopped before doing so."""
        hosts = {f.name: host for host, facts in domains.items() for f in facts}
        for row in slots.unsent(self.cat):
            if row.domain in hosts:
                self._create_job(row.id, Slot(row.policy, row.job, row.domain, row.slot_at, row.window_end,
                                              hosts[row.domain]))

    def _create_job(self, row_id: int, slot: Slot, *, send: bool = True) -> str | None:
        from virtwarden import submit

        assert slot.host is not None
        try:
            params = self._params(slot)
            job = submit.enqueue(self.cfg, self.cat, slot.job, slot.domain, slot.host, params, "scheduler",
                                 dedup_key=slot.key, interactive=False, send=send)
        except (Transient, PolicyError) as e:  # a policy file being edited is fixed soon, too
            self._not_created(row_id, slot, e)
            return None
        except VirtwardenError as e:
            if slots.move(self.cat, row_id, from_state=slots.STARTED, to_state=slots.SKIPPED,
                          reason=f"the job could not be created: {e}", cause="failed"):
                log.error("slot %s skipped: the job could not be created: %s", slot.key, e)
            return None
        slots.attach_job(self.cat, row_id, job.id)
        log.info("slot %s: job %s queued (%s of %s on host %s)", slot.key, job.id, slot.job, slot.domain, slot.host)
        return job.id

    def _not_created(self, row_id: int, slot: Slot, error: Exception) -> None:
        """A transient failure: when the job row exists (it could not be sent, so it is
        failed), record it; otherwise the slot waits for the next tick."""
        job_id = slots.job_with_key(self.cat, slot.key)
        if job_id is not None:
            slots.attach_job(self.cat, row_id, job_id, reason=f"the job could not be sent to a worker: {error}")
        else:
            slots.release(self.cat, row_id, f"the job could not be created: {error}")
        log.error("slot %s: the job could not be created or sent: %s", slot.key, error)

    def _params(self, slot: Slot) -> dict:
        """The job's parameters, settled from the slot's policy now, as ``virtwarden
        backup``, ``snapshot``, ``drill`` and ``verify`` settle them (the domain was just
        seen on the slot's host)."""
        from virtwarden import submit

        return submit.plan(self.cfg, self.cat, slot.job, slot.domain, policy=slot.policy, host=slot.host,
                           known_on_host=True).params


class _Sends:
    """The messages of a tick's started batches, sent from a thread of its own while the
    next batch's transaction runs: building and publishing messages (Celery, Python) and
    the catalog's round trips overlap instead of taking turns. A batch is handed over only
    once its transaction committed, so a job is never sent before its row exists; at most
    two batches wait. ``close()`` returns once every batch was sent and recorded, and
    raises what stopped the sends (the batches not sent then stay queued and due: the
    sweeper sends them, as after a crash between creating and sending)."""

    def __init__(self, cfg: Config, cat: Catalog, publisher: celery_app.Publisher | None = None) -> None:
        """``publisher``: the process that sends, for a tick of many batches; else this
        thread sends."""
        self.cfg, self.cat, self.publisher = cfg, cat, publisher
        self._queue: queue.Queue[list[jobs.JobView] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scheduler-sends", daemon=True)
        self._thread.start()

    def put(self, made: list[jobs.JobView]) -> None:
        if made:
            self._queue.put(made)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        from virtwarden import submit

        while (made := self._queue.get()) is not None:
            if self._error is not None:
                continue  # left queued for the sweeper
            try:
                submit.send_created(self.cfg, self.cat, made,
                                    send_many=self.publisher.send_many if self.publisher else None)
            except BaseException as e:  # noqa: BLE001 - raised again by close(), in the tick's thread
                self._error = e


# --- commands -----------------------------------------------------------------------------

def cli(args: argparse.Namespace) -> int:
    """``virtwarden scheduler [--once]``."""
    from virtwarden.worker import celery_app

    cfg = load_for_process(args.config)
    cat = Catalog(cfg.catalog_url)
    celery_app.configure(cfg)
    scheduler = Scheduler(cfg, cat, clock=clock_from_env())
    if args.once:
        try:
            report = scheduler.tick()
        finally:
            scheduler.close()
        print(report.summary())
        return EXIT_OK if report.ok else EXIT_FAILED
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    every = cfg.scheduler.tick_seconds
    log.warning("scheduler running: a tick every %gs over %d host(s), policies in %s", every, len(cfg.hosts),
                cfg.policies_path)
    presence = Presence(cat, "scheduler", []).start()
    try:
        scheduler.run(stop, every)
    finally:
        presence.close()
    return EXIT_OK


def preview_cli(args: argparse.Namespace) -> int:
    """``virtwarden schedule preview [--from T] [--to T] [--json]``."""
    from virtwarden.cli.output import emit_json, table

    try:
        start = parse_time(args.start, "--from") if args.start else clock_from_env()()
        end = parse_time(args.end, "--to") if args.end else start + PREVIEW_SPAN
    except ValueError as e:
        print(f"virtwarden: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if end <= start:
        print(f"virtwarden: error: --to ({end.isoformat()}) must be after --from ({start.isoformat()})",
              file=sys.stderr)
        return EXIT_USAGE
    cfg = load_for_process(args.config)
    rows, warnings = preview(cfg, start, end)
    for text in warnings:
        print(f"virtwarden: warning: {text}", file=sys.stderr)
    if args.json:
        emit_json(rows)
    elif rows:
        header = ["TIME (UTC)", "LOCAL TIME", "POLICY", "JOB", "DOMAIN", "HOST", "WINDOW END (UTC)"]
        fields = ["at", "local", "policy", "job", "domain", "host", "window_end"]
        print(table([[r[f] for f in fields] for r in rows], header))
    else:
        print(f"nothing scheduled between {start.isoformat()} and {end.isoformat()}")
    return EXIT_FAILED if warnings else EXIT_OK


def preview(cfg: Config, start: datetime, end: datetime) -> tuple[list[dict], list[str]]:
    """The slots between ``start`` and ``end`` as rows, and what was left out and why."""
    policies = load_policies(cfg)
    domains, unreachable = list_domains(cfg)
    problems: list[str] = []
    found = between(policies, domains, start, end, problems=problems)
    zones: dict[tuple[str, str], str] = {(p.name, job): s[1] for p in policies for job in SCHEDULED_JOBS
                                         if (s := schedule_of(p, job))}
    warnings = [f"host {host} left out: {why}" for host, why in unreachable.items()]
    warnings += [f"not scheduled: {text}" for text in sorted(set(problems))]
    return [_preview_row(s, zones[(s.policy, s.job)]) for s in found], warnings


def _preview_row(s: Slot, tz: str) -> dict:
    from zoneinfo import ZoneInfo

    return {"at": _utc(s.at), "local": s.at.astimezone(ZoneInfo(tz)).isoformat(), "timezone": tz,
            "policy": s.policy, "job": s.job, "domain": s.domain, "host": s.host, "window_end": _utc(s.window_end)}


def _utc(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
