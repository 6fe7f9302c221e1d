"""``virtwarden listen``: follow the hosts' libvirt events and start what policies ask for.

Threads, and why:
- libvirt's event loop (hypervisor.events.start_loop, registered before any connection
  is opened) runs the callbacks, which only put plain values on one queue;
- one watcher per host holds that host's event connection (opened within the
  ``libvirt`` section's open timeout, with its keepalive and a close callback) and
  reconnects with exponential backoff (``listener.backoff_min_seconds`` in the
  configuration, 1 by default, doubling up to ``backoff_max_seconds``, 60) when libvirt
  closes it, keepalive fails or opening times out; after every (re)connect it queues a
  reconciliation pass for its host;
- the dispatcher (the main thread) takes items off the queue in order: it records each
  event in the catalog (catalog.events), which keeps the domains table current, maps it
  to the policies' ``on:`` triggers (policies.triggers) and creates the jobs
  (virtwarden.submit, deduplicated by ``event:<event id>:<policy>:<run>`` so that handling
  one event twice never makes two jobs). A reconciliation pass lists the host's domains
  and records the events that were missed (virtwarden.daemons.reconcile), marked ``reconciled``.

The first pass for a host the catalog has never seen records its domains as a baseline
and starts nothing: turning the listener on must not back up a whole fleet at once
(schedules cover existing domains). A live event that happened before a pass that
already made it up (it was still queued) is recorded but starts nothing again.
"""
from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from virtwarden.catalog import events as catalog_events
from virtwarden.catalog.events import EventView
from virtwarden.catalog.services import Presence
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config, load_for_process
from virtwarden.daemons.connections import KeptConnections
from virtwarden.daemons.reconcile import SeenDomain, foreign, missed_events, part_of_start, state_after, still_here
from virtwarden.errors import (
    EXIT_OK,
    DatabaseUnavailable,
    DomainNotFound,
    HypervisorUnavailable,
    PolicyError,
    Transient,
    VirtwardenError,
)
from virtwarden.policies import Policy, load_policies, parse_metadata
from virtwarden.policies.select import DomainFacts
from virtwarden.policies.triggers import RUNS, TriggerAction, listened_events, triggers_for
from virtwarden.redact import mask

if TYPE_CHECKING:
    from virtwarden.catalog.jobs import JobView
    from virtwarden.hypervisor.events import EventConnection, HostEvent
    from virtwarden.submit import Planned

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECK_EVERY = 5.0  # how often a watcher looks at its connection besides the close callback
BATCH = 500  # live events handled together at most: one transaction records them
TRANSIENT_TRIES = 5  # broker or libvirt errors while starting a job; the database is waited for


@dataclass(frozen=True)
class Connected:
    """A watcher (re)connected to ``host`` and subscribed at ``at``: reconcile it."""

    host: str
    at: float


def cli(args: argparse.Namespace) -> int:
    from virtwarden.hypervisor import events

    events.start_loop()  # before anything below opens a libvirt connection
    from virtwarden.worker import celery_app

    cfg = load_for_process(args.config)
    hosts = args.host or list(cfg.hosts)
    for h in hosts:
        cfg.host(h)  # unknown names are an error before anything starts
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    listener = Listener(cfg, cat, hosts)
    # The handler only notes the signal: stopping takes locks, which a handler running in
    # the middle of this thread's own locked code must not.
    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signalled.append(signum))
    log.info("listening to %s (catalog %s)", ", ".join(hosts), mask(cfg.catalog_url))
    listener.start()
    presence = Presence(cat, "listener", hosts, backlog=listener.backlog).start()
    while not signalled and listener.running():
        time.sleep(0.5)
    log.info("stopping (%s)", signal.Signals(signalled[0]).name if signalled else "dispatcher ended")
    listener.stop()
    presence.close()
    return EXIT_OK


class Listener:
    def __init__(self, cfg: Config, cat: Catalog, hosts: list[str], *, backoff_min: float | None = None,
                 backoff_max: float | None = None) -> None:
        """``backoff_min``/``backoff_max``: the configuration's ``listener`` section unless given."""
        self.cfg, self.cat, self.hosts = cfg, cat, hosts
        self.backoff_min = cfg.listener.backoff_min_seconds if backoff_min is None else backoff_min
        self.backoff_max = max(self.backoff_min,
                               cfg.listener.backoff_max_seconds if backoff_max is None else backoff_max)
        self.queue: queue.Queue[Any] = queue.Queue()
        self._handling_since: float | None = None  # when the first item in hand arrived
        self._in_hand = 0  # items the dispatcher is handling
        self.stopping = threading.Event()
        self.dispatcher = Dispatcher(cfg, cat, self.stopping, backoff_max=self.backoff_max)

    def start(self) -> None:
        for host in self.hosts:
            threading.Thread(target=self._watch, args=(host,), name=f"watch-{host}", daemon=True).start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)
        self._dispatcher.start()

    def running(self) -> bool:
        return self._dispatcher.is_alive()

    def stop(self, timeout: float = 15) -> None:
        """Finish the item in hand (a retry gives up), then end."""
        self.stopping.set()
        self.queue.put_nowait(None)
        self._dispatcher.join(timeout)
        if not self._dispatcher.is_alive():
            self.dispatcher.connections.close()

    def _dispatch(self) -> None:
        """Items in order; the live events waiting one after another (up to ``BATCH``) are
        handled together: recorded in one transaction, then their triggers run."""
        held: Any = None  # an item taken off the queue that ends a batch, handled next
        while True:
            item = held if held is not None else self.queue.get()
            held = None
            if item is None or self.stopping.is_set():
                return
            batch = [item]
            while not isinstance(item, Connected) and len(batch) < BATCH:
                try:
                    following = self.queue.get_nowait()
                except queue.Empty:
                    break
                if following is None or isinstance(following, Connected):
                    held = following
                    break
                batch.append(following)
            self._handling_since, self._in_hand = item.at, len(batch)
            try:
                if isinstance(item, Connected):
                    self.dispatcher.handle(item)
                else:
                    self.dispatcher.handle_many(batch)
            finally:
                self._handling_since, self._in_hand = None, 0

    def backlog(self) -> tuple[int, float]:
        """The events and passes not handled yet (those in the dispatcher's hands and
        those waiting in the queue), and how long ago the oldest of them arrived (0 when
        there is none): reported with the listener's row, shown by the metrics. A
        catalog that answers slowly or not at all shows here first."""
        with self.queue.mutex:  # a look at the waiting items; the callbacks only append
            waiting = [item for item in self.queue.queue if item is not None]
        oldest = self._handling_since if self._handling_since is not None else (
            waiting[0].at if waiting else None)
        return self._in_hand + len(waiting), 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def _watch(self, host: str) -> None:
        while not self.stopping.is_set():
            try:
                self._follow(host)
            except Exception:  # a watcher that dies would leave its host unheard
                log.exception("host %s: watcher failed (a bug: please report it); starting it again", host)
                self.stopping.wait(self.backoff_max)

    def _follow(self, host: str) -> None:
        from virtwarden.hypervisor.events import EventConnection

        uri = self.cfg.host(host).uri
        conn = EventConnection(host, uri, self.queue)
        try:
            self._reconnecting(conn)
        finally:
            conn.close()

    def _reconnecting(self, conn: EventConnection) -> None:
        host, uri = conn.host, conn.uri
        delay = self.backoff_min
        while not self.stopping.is_set():
            try:
                conn.open()
            except HypervisorUnavailable as e:
                log.warning("%s; next attempt in %.0fs", e, delay)  # the message names the host
                self.stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            log.info("host %s: connected to %s, events subscribed", host, uri)
            connected_at = time.monotonic()
            self.queue.put(Connected(host, time.time()))
            while conn.alive() and not self.stopping.is_set():
                conn.lost.wait(CHECK_EVERY)
            reason = conn.close_reason or "the connection stopped answering"
            conn.close()
            if self.stopping.is_set():
                return
            if time.monotonic() - connected_at > self.backoff_max:
                delay = self.backoff_min  # it was up a while: start over; a flapping host keeps backing off
            log.warning("host %s: connection to %s lost (%s); reconnecting in %.0fs", host, uri, reason, delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, self.backoff_max)


class Dispatcher:
    """Records events, reconciles hosts and starts jobs, one queue item at a time."""

    def __init__(self, cfg: Config, cat: Catalog, stopping: threading.Event, *,
                 backoff_max: float | None = None) -> None:
        """``backoff_max``: the longest wait between retries; the configuration's unless given."""
        self.cfg, self.cat, self.stopping = cfg, cat, stopping
        self.backoff_max = cfg.listener.backoff_max_seconds if backoff_max is None else backoff_max
        self.policies = PolicyCache(cfg)
        self.connections = KeptConnections(cfg)  # reading a triggering event's domain
        self._metadata: dict[str, dict[str, str]] = {}  # domain UUID -> virtwarden metadata
        self._reconciled_at: dict[str, float] = {}  # domain UUID -> listing time of a pass that made up events

    def handle(self, item: Any) -> None:
        """One reconciliation pass, or one live event."""
        self._guarded(item, lambda: self.reconcile(item.host) if isinstance(item, Connected)
                      else self.handle_events([item]))

    def handle_many(self, items: list[Any]) -> None:
        """Live events waiting one after another, handled together. If they cannot be
        recorded together (not a database outage: that is waited for), each is handled
        alone, so that one event the catalog refuses loses only itself."""
        if len(items) == 1:
            self.handle(items[0])
            return
        try:
            self.handle_events(items)
        except Exception as e:  # noqa: BLE001 - nothing of the batch was recorded: one at a time
            if self.stopping.is_set():
                log.error("%d events not recorded: stopping (%s)", len(items), e)
                return
            log.warning("%d events could not be recorded together (%s); recording them one at a time",
                        len(items), e)
            for item in items:
                self.handle(item)

    def _guarded(self, item: Any, fn: Callable[[], None]) -> None:
        try:
            fn()
        except VirtwardenError as e:
            log.error("%s: %s", _describe(item), e)
        except Exception:  # one bad item must not stop the listener
            log.exception("%s: unexpected error (a bug: please report it with this traceback)", _describe(item))

    # --- live events --------------------------------------------------------------------
    def handle_events(self, evs: list[HostEvent]) -> None:
        """Record live events, in order and in one transaction, then start the jobs the
        triggers of each name. One failing trigger does not stop the others."""
        quiet: dict[int, bool] = {}  # position in evs -> starts nothing

        def arrival(n: int, ev: HostEvent) -> catalog_events.Arrival:
            stale = self._reconciled_at.get(ev.uuid, 0.0) >= ev.at

            def decide(before: catalog_events.KnownDomain | None) -> tuple[str | None, str | None, bool]:
                previous = before.state if before else None
                detail, touch, quiet[n] = ev.detail, True, stale
                if stale:
                    detail += "; made up by reconciliation already"
                elif before is not None and foreign(ev.kind, ev.host, before):
                    quiet[n], touch, detail = True, False, f"{detail}; the domain runs on host {before.host}"
                elif part_of_start(ev.kind, previous):
                    quiet[n], detail = True, detail + "; part of a start"
                return detail, None if stale else state_after(ev.kind, ev.detail, previous), touch

            return catalog_events.Arrival(ev.host, ev.domain, ev.uuid, ev.kind,
                                          datetime.fromtimestamp(ev.at, UTC), decide)

        arrivals = [arrival(n, ev) for n, ev in enumerate(evs)]
        first = evs[0]
        what = (f"recording {first.kind} of {first.domain} on host {first.host}" if len(evs) == 1
                else f"recording {len(evs)} events")
        recs = self._retry(what, lambda: catalog_events.record_many(self.cat, arrivals))
        triggered: list[tuple[EventView, TriggerAction]] = []
        for n, rec in enumerate(recs):
            log.info("event %d: %s of %s on host %s (%s)", rec.id, rec.kind, rec.domain, rec.host, rec.detail)
            if quiet[n]:
                continue
            try:
                triggered += [(rec, action) for action in self._actions(rec)]
            except VirtwardenError as e:
                log.error("event %d: %s", rec.id, e)
            except Exception:  # one bad event must not keep the others' jobs from starting
                log.exception("event %d: unexpected error (a bug: please report it with this traceback)", rec.id)
        try:  # the events are recorded: nothing here may make the batch be handled again
            self._start(triggered)
        except Exception:
            log.exception("%d job(s) of events: unexpected error (a bug: please report it with this traceback)",
                          len(triggered))

    # --- triggers -----------------------------------------------------------------------
    def start_jobs(self, rec: EventView) -> None:
        """Start the jobs one event's triggers name."""
        self._start([(rec, action) for action in self._actions(rec)])

    def _actions(self, rec: EventView) -> list[TriggerAction]:
        found = self.policies.get()
        if rec.kind not in listened_events(found) or rec.domain is None:
            return []
        # Only selectors read a domain's metadata: when none names any, libvirt is not
        # asked for it (a round trip per triggering event to a remote host).
        metadata = self._metadata_of(rec) if any(p.spec.selector.metadata for p in found) else {}
        facts = DomainFacts(rec.domain, rec.host, metadata)
        actions: list[TriggerAction] = []
        for run in RUNS:  # one job's ambiguous policies must not hold back the others
            try:
                actions += triggers_for(rec.kind, facts, found, runs=(run,))
            except PolicyError as e:
                log.error("event %d (%s of %s): no %s started: %s", rec.id, rec.kind, rec.domain, run, e)
        return actions

    def _start(self, triggered: list[tuple[EventView, TriggerAction]]) -> None:
        """Plan each triggered job (one that cannot be planned is logged and left out),
        then create and send them together (``submit.enqueue_many``: one transaction,
        pipelined messages). If that fails for another reason than a database outage
        (waited for), they are started one at a time, so one bad job loses only itself."""
        from virtwarden import submit

        requests: list[tuple[EventView, TriggerAction, submit.Request]] = []
        for rec, action in triggered:
            try:
                planned = self._retry(f"event {rec.id}: planning {action.run} of {rec.domain}",
                                      lambda: self._plan(rec, action))  # noqa: B023 - runs now
            except VirtwardenError as e:
                self._not_started(rec, action, e)
                continue
            requests.append((rec, action, submit.Request(planned, "event", _dedup_key(rec, action))))
        if not requests:
            return
        try:
            made = self._retry(f"starting {len(requests)} job(s)",
                               lambda: submit.enqueue_many(self.cfg, self.cat, [r for _, _, r in requests]))
        except Exception as e:  # noqa: BLE001 - one at a time says which
            if self.stopping.is_set():
                log.error("%d job(s) of events not started: stopping (%s)", len(requests), e)
                return
            if len(requests) > 1:
                log.warning("%d jobs could not be started together (%s); starting them one at a time",
                            len(requests), e)
            for rec, action, request in requests:
                try:
                    job = self._retry(f"event {rec.id}: starting {action.run} of {rec.domain}",
                                      lambda: submit.enqueue_many(self.cfg, self.cat, [request])[0])  # noqa: B023
                except Exception as e:  # noqa: BLE001 - this one job is not started, the others are
                    self._not_started(rec, action, e)
                    continue
                self._started(rec, action, job)
            return
        for (rec, action, _), job in zip(requests, made, strict=True):
            self._started(rec, action, job)

    def _plan(self, rec: EventView, action: TriggerAction) -> Planned:
        from virtwarden import submit

        assert rec.domain is not None
        options = {"full": True} if action.full else {}
        return submit.plan(self.cfg, self.cat, action.run, rec.domain, policy=action.policy, host=rec.host,
                           known_on_host=True, **options)

    @staticmethod
    def _started(rec: EventView, action: TriggerAction, job: JobView) -> None:
        log.info("event %d: %s of %s on host %s -> %s job %s (policy %s%s)", rec.id, rec.kind, rec.domain,
                 rec.host, action.run, job.id, action.policy, ", full" if action.full else "")

    @staticmethod
    def _not_started(rec: EventView, action: TriggerAction, e: Exception) -> None:
        log.error("event %d (%s of %s on host %s): %s for policy %s not started: %s",
                  rec.id, rec.kind, rec.domain, rec.host, action.run, action.policy, e)

    def _metadata_of(self, rec: EventView) -> dict[str, str]:
        """The domain's virtwarden metadata, from libvirt (over the host's kept connection);
        the last known when it is gone."""
        assert rec.domain is not None and rec.domain_uuid is not None
        domain = rec.domain
        try:
            info = self.connections.use(rec.host, lambda hv: hv.domain(domain, sizes=False))
            if info.uuid == rec.domain_uuid:
                self._metadata[info.uuid] = parse_metadata(info.xml)
        except (DomainNotFound, HypervisorUnavailable) as e:
            log.debug("event %d: metadata of %s not read (%s); using the last known", rec.id, rec.domain, e)
        return self._metadata.get(rec.domain_uuid, {})

    # --- reconciliation -----------------------------------------------------------------
    def reconcile(self, host: str) -> None:
        """Compare the host's domains with the catalog and record what was missed."""
        from virtwarden.hypervisor import connect

        listed_at = time.time()
        try:
            with connect(host, self.cfg.host(host).uri) as hv:
                infos = self._retry(f"listing domains of host {host}", lambda: hv.domains(sizes=False), tries=3,
                                    retry_on=(DomainNotFound,))
        except HypervisorUnavailable as e:
            log.warning("host %s: reconciliation skipped (%s); the next reconnect tries again", host, e)
            return
        seen = [SeenDomain(i.uuid, i.name, i.state, i.persistent) for i in infos]
        for info in infos:
            self._metadata[info.uuid] = parse_metadata(info.xml)
        known = self._retry("reading the domains table", lambda: catalog_events.domains(self.cat))
        first = not self._retry("reading the hosts table", lambda: catalog_events.host_known(self.cat, host))
        missed = [] if first else missed_events(host, known, seen)
        for m in missed:
            def record(m: Any = m) -> EventView:
                return catalog_events.record(self.cat, host=host, domain=m.name, uuid=m.uuid, kind=m.kind,
                                             detail=m.detail, state=m.state)

            rec = self._retry(f"recording {m.kind} of {m.name} on host {host}", record)
            self._reconciled_at[m.uuid] = listed_at
            log.info("event %d: %s of %s on host %s (%s)", rec.id, rec.kind, rec.domain, host, rec.detail)
            self.start_jobs(rec)
        hc = self.cfg.host(host)
        self._retry("updating the domains table", lambda: catalog_events.note_domains(
            self.cat, still_here(host, known, seen)))
        self._retry("updating the hosts table",
                    lambda: catalog_events.host_reconciled(self.cat, host, hc.uri, hc.group))
        if first:
            log.info("host %s: reconciled (first contact): %d domain(s) recorded as the baseline, no jobs started",
                     host, len(seen))
        else:
            log.info("host %s: reconciled: %d domain(s), %d missed event(s)", host, len(seen), len(missed))

    # --- retries ------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T], *, tries: int = TRANSIENT_TRIES,
               retry_on: tuple[type[Exception], ...] = ()) -> T:
        """``fn()``, again after transient errors with a doubling delay: the database
        until it answers (events must not be lost), anything else ``tries`` times."""
        delay, attempt = 1.0, 0
        retryable: tuple[type[Exception], ...] = (Transient, *retry_on)
        while True:
            try:
                return fn()
            except retryable as e:
                attempt += 1
                if (attempt >= tries and not isinstance(e, DatabaseUnavailable)) or self.stopping.is_set():
                    raise
                log.warning("%s: %s; trying again in %.0fs", what, e, delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, self.backoff_max)


def _dedup_key(rec: EventView, action: TriggerAction) -> str:
    """One job per event, policy and job kind, however often the event is handled."""
    return f"event:{rec.id}:{action.policy}:{action.run}"


class PolicyCache:
    """The policy directory as it is now (policies.load_dir reads it again only when a
    file in it changed). While a changed directory does not load, the last policies
    that did stay in force; each change is logged once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._policies: list[Policy] = []
        self._error: str | None = None
        self._loaded = False

    def get(self) -> list[Policy]:
        try:
            found = load_policies(self.cfg)
        except PolicyError as e:
            if str(e) != self._error:
                self._error = str(e)
                log.error("policies in %s not reloaded, the previous ones stay in force: %s",
                          self.cfg.policies_path, e)
            return self._policies
        self._error = None
        if not self._loaded or found != self._policies:
            self._loaded, self._policies = True, found
            log.info("policies loaded from %s: %s", self.cfg.policies_path, ", ".join(p.name for p in found) or "none")
        return self._policies


def _describe(item: Any) -> str:
    if isinstance(item, Connected):
        return f"reconciling host {item.host}"
    return f"event {getattr(item, 'kind', '?')} of {getattr(item, 'domain', '?')} on host {getattr(item, 'host', '?')}"
