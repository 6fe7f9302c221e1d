"""The event listener: libvirt events become catalog events and the jobs that policies'
``on:`` triggers ask for, and a libvirtd restart is survived with nothing missed.

The pure parts (event mapping, triggers, reconciliation) are tested with tables; the
integration tests run ``virtwarden listen`` and ``virtwarden worker`` as processes
against real libvirtd hosts, and nothing but libvirt itself starts the backups.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from virtwarden.catalog.events import KnownDomain
from virtwarden.policies import Policy
from virtwarden.policies.select import DomainFacts
from virtwarden.policies.triggers import TriggerAction, triggers_for

from tests import forkserver
from tests.conftest import need, need_module
from tests.fleet import HOST2_PID, restart_host2, stop_host2_libvirtd
from tests.harness import REDIS_URL, wait_for
from virtwarden.daemons.reconcile import SeenDomain, foreign, missed_events, part_of_start, state_after
from virtwarden.errors import PolicyError

# Our own Redis database: other test runs on this machine flush theirs (and their workers
# would take messages for host.local from a shared one).
# restarts host2's libvirtd: every host2 user shares one xdist worker
pytestmark = [pytest.mark.xdist_group("host2"), pytest.mark.cli_in_process]
LISTENER_REDIS_URL = os.environ.get("VIRTWARDEN_TEST_LISTENER_REDIS_URL", re.sub(r"/\d+$", "/13", REDIS_URL))


# --- libvirt's lifecycle codes -> product events --------------------------------------------
@pytest.mark.parametrize("event, detail, kind", [
    ("DEFINED", "DEFINED_ADDED", "domain.defined"),
    ("DEFINED", "DEFINED_UPDATED", "domain.updated"),
    ("UNDEFINED", "UNDEFINED_REMOVED", "domain.undefined"),
    ("STARTED", "STARTED_BOOTED", "domain.started"),
    ("STARTED", "STARTED_RESTORED", "domain.started"),
    ("STARTED", "STARTED_MIGRATED", "domain.incoming"),
    ("SUSPENDED", "SUSPENDED_PAUSED", "domain.suspended"),
    ("SUSPENDED", "SUSPENDED_MIGRATED", "domain.suspended"),  # also fires when a migration fails
    ("RESUMED", "RESUMED_UNPAUSED", "domain.resumed"),
    ("RESUMED", "RESUMED_MIGRATED", "domain.migrated"),
    ("STOPPED", "STOPPED_SHUTDOWN", "domain.stopped"),
    ("STOPPED", "STOPPED_DESTROYED", "domain.stopped"),
    ("STOPPED", "STOPPED_CRASHED", "domain.crashed"),
    ("STOPPED", "STOPPED_FAILED", "domain.crashed"),
    ("STOPPED", "STOPPED_MIGRATED", "domain.departed"),
    ("PMSUSPENDED", "PMSUSPENDED_MEMORY", "domain.suspended"),
    ("CRASHED", "CRASHED_PANICKED", "domain.crashed"),
])
def test_lifecycle_events_map_to_product_events(event: str, detail: str, kind: str) -> None:
    libvirt = need_module("libvirt")
    from virtwarden.hypervisor.events import lifecycle_kind

    code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}")
    assert lifecycle_kind(code, getattr(libvirt, f"VIR_DOMAIN_EVENT_{detail}"))[0] == kind


# --- triggers ---------------------------------------------------------------------------------
def _policy(name: str, domains: list[str], on: list[dict], priority: int = 0, **spec: object) -> Policy:
    return Policy.model_validate({
        "apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": name},
        "spec": {"selector": {"domains": domains}, "backup": {"target": "nfs", "priority": priority},
                 "on": on, **spec}})


STARTED_BACKUP = [{"event": "domain.started", "run": "backup"}]


def test_a_trigger_of_the_governing_policy_starts_its_job() -> None:
    p = _policy("web", ["web-*"], STARTED_BACKUP + [{"event": "domain.defined", "run": "backup", "full": True}])
    facts = DomainFacts("web-1", "h1")
    assert triggers_for("domain.started", facts, [p]) == [TriggerAction("web", "backup", False)]
    assert triggers_for("domain.defined", facts, [p]) == [TriggerAction("web", "backup", True)]
    assert triggers_for("domain.stopped", facts, [p]) == []
    assert triggers_for("block-job", facts, [p]) == []
    assert triggers_for("domain.started", DomainFacts("db-1", "h1"), [p]) == []


def test_two_matching_policies_start_one_job_with_the_governing_one() -> None:
    low = _policy("all", ["*"], STARTED_BACKUP)
    high = _policy("web", ["web-*"], STARTED_BACKUP, priority=5)
    assert triggers_for("domain.started", DomainFacts("web-1"), [low, high]) == [TriggerAction("web", "backup")]
    # The governing policy speaks alone: without a trigger of its own, nothing runs.
    silent = _policy("web", ["web-*"], [], priority=5)
    assert triggers_for("domain.started", DomainFacts("web-1"), [low, silent]) == []


def test_equal_priorities_are_an_error_not_two_jobs() -> None:
    a, b = _policy("a", ["web-*"], STARTED_BACKUP), _policy("b", ["*"], STARTED_BACKUP)
    with pytest.raises(PolicyError, match="both select domain 'web-1' for backup"):
        triggers_for("domain.started", DomainFacts("web-1"), [a, b])


def test_snapshot_and_drill_triggers_by_metadata() -> None:
    p = _policy("gold", ["*"], [{"event": "domain.crashed", "run": "snapshot"},
                                {"event": "domain.migrated", "run": "drill"}],
                selector={"metadata": {"tier": "gold"}}, snapshots={"type": "internal"})
    gold = DomainFacts("db-1", "h1", {"tier": "gold"})
    assert triggers_for("domain.crashed", gold, [p]) == [TriggerAction("gold", "snapshot")]
    assert triggers_for("domain.migrated", gold, [p]) == [TriggerAction("gold", "drill")]
    assert triggers_for("domain.crashed", DomainFacts("db-1", "h1", {"tier": "iron"}), [p]) == []


# --- reconciliation -------------------------------------------------------------------------
def _known(uuid: str, state: str | None, host: str = "h1") -> KnownDomain:
    return KnownDomain(uuid, f"vm-{uuid}", host, state)


def _seen(uuid: str, state: str, persistent: bool = True) -> SeenDomain:
    return SeenDomain(uuid, f"vm-{uuid}", state, persistent)


@pytest.mark.parametrize("before, now, kinds", [
    (None, _seen("a", "running"), ["domain.defined", "domain.started"]),
    (None, _seen("a", "shutoff"), ["domain.defined"]),
    (None, _seen("a", "running", persistent=False), ["domain.started"]),
    (_known("a", "undefined"), _seen("a", "paused"), ["domain.defined", "domain.started", "domain.suspended"]),
    (_known("a", "shutoff"), _seen("a", "running"), ["domain.started"]),
    (_known("a", "running"), _seen("a", "shutoff"), ["domain.stopped"]),
    (_known("a", "paused"), _seen("a", "crashed"), ["domain.crashed"]),
    (_known("a", "running"), _seen("a", "paused"), ["domain.suspended"]),
    (_known("a", "pmsuspended"), _seen("a", "running"), ["domain.resumed"]),
    (_known("a", "running"), _seen("a", "running"), []),
    (_known("a", "running", host="h2"), _seen("a", "running"), ["domain.migrated"]),
    (_known("a", "running", host="h2"), _seen("a", "shutoff"), []),  # a leftover definition here
    (_known("a", "running"), None, ["domain.undefined"]),
    (_known("a", "undefined"), None, []),
    (_known("a", "departed"), None, []),
    (_known("a", "running", host="h2"), None, []),
])
def test_reconciliation_makes_up_the_missed_events(before, now, kinds) -> None:
    known = {before.uuid: before} if before else {}
    missed = missed_events("h1", known, [now] if now else [])
    assert [m.kind for m in missed] == kinds
    assert all(m.detail.startswith("reconciled: ") for m in missed)


def test_live_events_move_the_recorded_state() -> None:
    assert state_after("domain.defined", "added", None) == "shutoff"
    assert state_after("domain.defined", "renamed", "running") is None
    assert state_after("domain.started", "booted", "shutoff") == "running"
    assert state_after("domain.suspended", "memory", "running") == "pmsuspended"
    assert state_after("domain.undefined", "removed", "running") is None  # runs on as a transient domain
    assert state_after("domain.undefined", "removed", "shutoff") == "undefined"
    assert state_after("block-job", "vda commit ready", "running") is None
    # libvirt says RESUMED just before STARTED when QEMU boots: part of the start only.
    assert part_of_start("domain.resumed", "shutoff") and part_of_start("domain.resumed", None)
    assert not part_of_start("domain.resumed", "paused")


def test_events_from_a_host_the_domain_does_not_run_on_move_nothing() -> None:
    on_h1 = KnownDomain("a", "vm-a", "h1", "running")
    assert foreign("domain.crashed", "h2", on_h1)  # an incoming migration failed on h2
    assert foreign("domain.departed", "h2", on_h1)  # h2 says it left; h1 said it arrived first
    assert not foreign("domain.migrated", "h2", on_h1)  # the arrival moves it
    assert not foreign("domain.started", "h2", KnownDomain("a", "vm-a", "h1", "shutoff"))
    assert not foreign("domain.stopped", "h1", on_h1)


@pytest.mark.celery
def _crash_snapshot_config(tmp_path: Path, **extra):
    """A configuration whose one policy snapshots ``db-*`` when it crashes, on libvirt's
    in-process test driver (no db-1 there: its metadata is the last known)."""
    from virtwarden import config

    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "gold.yaml").write_text(yaml.safe_dump(_policy(
        "gold", ["db-*"], [{"event": "domain.crashed", "run": "snapshot"}], snapshots={"type": "internal"},
    ).model_dump(mode="json", exclude_none=True)))
    cfg_file = tmp_path / "virtwarden.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "broker_url": LISTENER_REDIS_URL, "policy_dir": str(policy_dir),
        "hosts": {"t": {"uri": "test:///default"}},
        "storage": {"nfs": {"type": "nfs", "path": str(tmp_path / "repo"), "create": True}}, **extra}))
    return config.load(str(cfg_file), env={})


CRASH_SNAPSHOT = ("snapshot", "db-1", "event", {"domain": "db-1", "policy": "gold", "type": "internal",
                                                "quiesce": "auto", "retention": None})


def test_an_event_handled_twice_makes_one_job(tmp_path: Path, redis_url: str) -> None:
    """The dispatcher retries after errors; the job's dedup key (event id, policy, job)
    makes the second attempt find the first job instead of sending another."""
    need_module("libvirt")
    import redis
    from virtwarden.catalog import events, jobs
    from virtwarden.catalog.store import Catalog
    from virtwarden.worker import celery_app

    from virtwarden.daemons.listener import Dispatcher

    cfg = _crash_snapshot_config(tmp_path)
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    try:
        rec = events.record(cat, host="t", domain="db-1", uuid="5b0c1a52-8d1e-4a1e-9a43-3c0b1f0e7d11",
                            kind="domain.crashed", detail="panicked", state="crashed")
        dispatcher = Dispatcher(cfg, cat, threading.Event())
        dispatcher.start_jobs(rec)
        dispatcher.start_jobs(rec)
        found = [(j.kind, j.domain, j.requested_by, j.params) for j in jobs.recent(cat)]
        assert found == [CRASH_SNAPSHOT]
        assert dispatcher.connections.kept("t") is None  # no selector reads metadata: libvirt was not asked
    finally:
        cat.close()
        redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def test_a_policy_that_selects_by_metadata_reads_it_from_the_events_host(tmp_path: Path, redis_url: str) -> None:
    """With a selector on metadata, the listener reads each triggering domain's metadata
    over its kept connection to the event's host (libvirt's test driver, from a node file):
    the gold domain's crash snapshots it, the iron one's starts nothing."""
    need_module("libvirt")
    import redis
    from virtwarden.catalog import events, jobs
    from virtwarden.catalog.store import Catalog
    from virtwarden.policies.select import METADATA_NAMESPACE
    from virtwarden.worker import celery_app

    from virtwarden import config
    from virtwarden.daemons.listener import Dispatcher

    domains = "".join(
        f"<domain type='test'><name>db-{tier}</name><memory>65536</memory><os><type>hvm</type></os>"
        f"<metadata><vw:virtwarden xmlns:vw='{METADATA_NAMESPACE}'><vw:tier>{tier}</vw:tier></vw:virtwarden>"
        f"</metadata></domain>" for tier in ("gold", "iron"))
    node = tmp_path / "node.xml"
    node.write_text(f"<node>{domains}</node>")
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "gold.yaml").write_text(yaml.safe_dump(_policy(
        "gold", ["db-*"], [{"event": "domain.crashed", "run": "snapshot"}], snapshots={"type": "internal"},
        selector={"domains": ["db-*"], "metadata": {"tier": "gold"}},
    ).model_dump(mode="json", exclude_none=True)))
    cfg_file = tmp_path / "virtwarden.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "broker_url": LISTENER_REDIS_URL, "policy_dir": str(policy_dir),
        "hosts": {"t": {"uri": f"test://{node}"}},
        "storage": {"nfs": {"type": "nfs", "path": str(tmp_path / "repo"), "create": True}}}))
    cfg = config.load(str(cfg_file), env={})
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    try:
        dispatcher = Dispatcher(cfg, cat, threading.Event())
        for tier in ("gold", "iron"):
            info = dispatcher.connections.use("t", lambda hv, t=tier: hv.domain(f"db-{t}", sizes=False))
            rec = events.record(cat, host="t", domain=f"db-{tier}", uuid=info.uuid, kind="domain.crashed",
                                detail="panicked", state="crashed")
            dispatcher.start_jobs(rec)
        assert [(j.kind, j.domain) for j in jobs.recent(cat)] == [("snapshot", "db-gold")]
    finally:
        cat.close()
        redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def test_events_waiting_together_are_recorded_together_and_one_refused_loses_only_itself(
        tmp_path: Path, redis_url: str, pg_schema_url: str) -> None:
    """Events queued while the dispatcher is busy are taken together and recorded in one
    transaction, in order, each seeing the domain as the ones before it left it (a crash
    of db-1 after its start is no part of a start, so it snapshots). One that PostgreSQL
    refuses (a name longer than its column) fails the batch: each event is then recorded
    alone and only that one is lost."""
    need_module("libvirt")
    import redis
    from virtwarden.catalog import events, jobs
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent
    from virtwarden.worker import celery_app

    from virtwarden.daemons.listener import Listener

    cfg = _crash_snapshot_config(tmp_path, database_url=pg_schema_url)
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    uuid = "5b0c1a52-8d1e-4a1e-9a43-3c0b1f0e7d11"
    listener = Listener(cfg, cat, [], backoff_min=1, backoff_max=1)
    batches: list[int] = []
    handle_many = listener.dispatcher.handle_many
    listener.dispatcher.handle_many = lambda items: (batches.append(len(items)), handle_many(items))[1]  # type: ignore[method-assign]
    try:
        now = time.time()
        for n, (domain, kind, detail) in enumerate([("db-1", "domain.started", "booted"),
                                                     ("db-1", "domain.crashed", "panicked"),
                                                     ("x" * 300, "domain.started", "booted"),
                                                     ("web-1", "domain.started", "booted")]):
            listener.queue.put(HostEvent("t", domain, uuid if domain == "db-1" else f"{uuid[:-1]}{n}", kind,
                                         detail, now + n / 1000))
        listener.start()  # everything waits already: one batch
        wait_for(lambda: len(events.recent(cat)) == 3 and not listener.backlog()[0], 30, "the events recorded")
        assert batches == [4]
        assert [(e.domain, e.kind) for e in events.recent(cat)] == [
            ("db-1", "domain.started"), ("db-1", "domain.crashed"), ("web-1", "domain.started")]
        assert events.domain(cat, uuid).state == "crashed"
        assert [(j.kind, j.domain, j.requested_by, j.params) for j in jobs.recent(cat)] == [CRASH_SNAPSHOT]
    finally:
        listener.stop()
        cat.close()
        redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def test_a_burst_of_triggering_events_with_the_broker_away_creates_every_job_and_loses_none(
        tmp_path: Path, redis_url: str) -> None:
    """Six crashes wait together: their events are recorded in one transaction and their
    six snapshot jobs created in one more; the broker (Redis behind a proxy that is cut)
    cannot take their messages, so every job stays queued and due, none sent. Once the
    broker is back the sweeper sends each, and each job's message is in its queue."""
    need_module("libvirt")
    import redis
    from virtwarden.catalog import events, jobs
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent
    from virtwarden.worker import celery_app
    from virtwarden.worker.outbox import Sweeper

    from tests.faults import CuttableProxy
    from virtwarden.daemons.listener import Listener

    port = int(LISTENER_REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    with CuttableProxy(port) as proxy:
        cfg = _crash_snapshot_config(tmp_path, broker_url=proxy.url(LISTENER_REDIS_URL))
        celery_app.configure(cfg)
        cat = Catalog(cfg.catalog_url)
        listener = Listener(cfg, cat, [], backoff_min=1, backoff_max=1)
        try:
            proxy.cut()
            now = time.time()
            for n in range(6):
                listener.queue.put(HostEvent("t", f"db-{n}", f"5b0c1a52-8d1e-4a1e-9a43-3c0b1f0e7d1{n}",
                                             "domain.crashed", "panicked", now + n / 1000))
            listener.start()
            wait_for(lambda: len(jobs.recent(cat)) == 6 and not listener.backlog()[0], 60, "six jobs")
            assert len(events.recent(cat)) == 6
            made = jobs.recent(cat)
            assert sorted(j.domain for j in made) == [f"db-{n}" for n in range(6)]
            assert all(j.state == "queued" and j.sends == 0 and j.kind == "snapshot" for j in made)

            proxy.restore()
            report = Sweeper(cfg, cat, celery_app.send).sweep()
            assert sorted(report.resent) == sorted(j.id for j in made)
            assert all(j.sends == 1 for j in jobs.recent(cat))
            queued = [m.decode() for m in redis.Redis.from_url(LISTENER_REDIS_URL).lrange(
                celery_app.queue_for("t"), 0, -1)]
            assert all(sum(j.id in m for m in queued) == 1 for j in made)
        finally:
            listener.stop()
            cat.close()
            redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def test_a_catalog_away_through_several_retries_loses_no_event(tmp_path: Path, redis_url: str,
                                                                pg_schema_url: str) -> None:
    """PostgreSQL goes away (its connections cut, new ones closed) just before an event
    is recorded and stays away through three retries, their delay doubling up to
    ``backoff_max``. Once it is back, the event is recorded once and its job started once."""
    need_module("libvirt")
    import logging

    import redis
    from virtwarden.catalog import events, jobs
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent
    from virtwarden.worker import celery_app

    from tests.faults import CuttableProxy
    from virtwarden.daemons.listener import Dispatcher

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logger = logging.getLogger("virtwarden.daemons.listener")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    with CuttableProxy(5432) as proxy:
        cfg = _crash_snapshot_config(tmp_path, database_url=proxy.url(pg_schema_url))
        celery_app.configure(cfg)
        cat = Catalog(cfg.catalog_url)
        try:
            dispatcher = Dispatcher(cfg, cat, threading.Event(), backoff_max=2)
            proxy.cut()
            event = HostEvent("t", "db-1", "5b0c1a52-8d1e-4a1e-9a43-3c0b1f0e7d11", "domain.crashed", "panicked",
                              time.time())
            handling = threading.Thread(target=dispatcher.handle, args=(event,))
            handling.start()

            def retried() -> list[str]:
                found = [w for w in warnings if w.startswith("recording domain.crashed of db-1")]
                return found if len(found) >= 3 else []

            tries = wait_for(retried, 30, lambda: f"three retries; logged: {warnings}")
            proxy.restore()
            handling.join(30)
            assert not handling.is_alive()
            assert [w.rsplit("trying again in ", 1)[1] for w in tries[:3]] == ["1s", "2s", "2s"]
            assert [(e.kind, e.domain) for e in events.recent(cat)] == [("domain.crashed", "db-1")]
            assert [(j.kind, j.domain, j.requested_by, j.params) for j in jobs.recent(cat)] == [CRASH_SNAPSHOT]
        finally:
            logger.removeHandler(handler)
            cat.close()
            redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def test_a_listener_reports_the_backlog_a_catalog_outage_builds_and_its_drain(tmp_path: Path, redis_url: str,
                                                                               pg_schema_url: str) -> None:
    """The catalog (PostgreSQL, through a proxy) goes away while five events arrive: none
    can be recorded (the dispatcher retries the batch it holds). The listener's row says
    so at its next beat (five not handled, the first one's wait), and so do the metrics;
    once the catalog is back every event is handled and the next beat reports nothing."""
    need_module("libvirt")
    import redis
    from virtwarden.catalog import events
    from virtwarden.catalog.services import Presence, listed
    from virtwarden.catalog.store import Catalog
    from virtwarden.hypervisor.events import HostEvent
    from virtwarden.worker import celery_app

    from tests.faults import CuttableProxy
    from virtwarden.api.metrics import CatalogCollector
    from virtwarden.daemons.listener import Listener

    direct = Catalog(pg_schema_url)  # what the row is written through: the proxy is for the dispatcher
    with CuttableProxy(5432) as proxy:
        cfg = _crash_snapshot_config(tmp_path, database_url=proxy.url(pg_schema_url))
        celery_app.configure(cfg)
        cat = Catalog(cfg.catalog_url)
        listener = Listener(cfg, cat, [], backoff_min=1, backoff_max=1)
        presence = Presence(direct, "listener", ["t"], backlog=listener.backlog, every=0.5).start()
        try:
            listener.start()
            proxy.cut()
            began = time.time()
            for n in range(5):
                listener.queue.put(HostEvent("t", f"web-{n}", f"5b0c1a52-8d1e-4a1e-9a43-3c0b1f0e7d1{n}",
                                             "domain.started", "booted", time.time()))

            def reported() -> tuple[int | None, float | None] | None:
                row = next(r for r in listed(direct) if r.kind == "listener")
                return (row.backlog, row.lag_seconds) if row.backlog == 5 and (row.lag_seconds or 0) >= 2 else None

            waiting, waited = wait_for(reported, 30, lambda: f"a beat reporting the backlog: {listed(direct)}")
            assert waited <= time.time() - began + 1
            text = "\n".join(f"{m.name} {s.labels} {s.value}" for m in CatalogCollector(direct).collect()
                             for s in m.samples if m.name.startswith("virtwarden_listener"))
            node = socket.gethostname()
            assert f"virtwarden_listener_backlog {{'node': '{node}', 'hosts': 't'}} 5" in text, text
            assert "virtwarden_listener_lag_seconds" in text
            proxy.restore()
            wait_for(lambda: len(events.recent(direct)) == 5, 60, "the five events to be recorded")
            wait_for(lambda: [(r.backlog, r.lag_seconds) for r in listed(direct) if r.kind == "listener"] == [(0, 0.0)],
                     30, "a beat reporting nothing waiting")
        finally:
            listener.stop()
            presence.close()
            cat.close()
            direct.close()
            redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


# --- integration: real libvirtd, listener, worker -------------------------------------------
POLICY = """\
apiVersion: virtwarden/v1
kind: Policy
metadata:
  name: on-start
spec:
  selector:
    domains: ["{glob}"]
  backup:
    target: nfs
  on:
    - event: domain.started
      run: backup
"""


class ListenerProcess:
    """``virtwarden listen`` in its own process group, its output in a log file."""

    def __init__(self, vw, hosts: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        config = vw.write_config()
        self.log = vw.root / "listener.log"
        args = ["--config", str(config), "--log-level", "info", "listen"]
        for h in hosts or []:
            args += ["--host", h]
        full_env = {**os.environ, **(env or {})}
        full_env.pop("VIRTWARDEN_DATABASE_URL", None)
        full_env.pop("VIRTWARDEN_BROKER_URL", None)
        self.proc = forkserver.spawn(args, env=full_env, out=self.log)

    def text(self, after: int = 0) -> str:
        return self.log.read_bytes()[after:].decode(errors="replace")

    def wait_for(self, needle: str, *, after: int = 0, timeout: float = 60) -> int:
        """Wait until ``needle`` is logged after offset ``after``; the offset just past it."""
        def logged() -> int | None:
            found = self.log.read_bytes().find(needle.encode(), after)
            if found >= 0:
                return found + len(needle)
            if self.proc.poll() is not None:
                raise AssertionError(f"listener exited ({self.proc.returncode}) before logging {needle!r}:\n"
                                     f"{self.text()[-4000:]}")
            return None

        return wait_for(logged, timeout, lambda: f"the listener to log {needle!r}:\n{self.text()[-4000:]}", poll=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def installation(vw, tmp_path):
    """``vw`` on a Redis database of its own, with the on-start policy for one name."""
    import redis

    redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()
    vw.extra["broker_url"] = LISTENER_REDIS_URL
    name = f"vwtest-lsn{secrets.token_hex(3)}"
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    # Only this test's domain: other tests' guests on the same hosts are none of ours.
    (policy_dir / "on-start.yaml").write_text(POLICY.format(glob=name))
    vw.extra["policy_dir"] = str(policy_dir)
    yield vw, name
    redis.Redis.from_url(LISTENER_REDIS_URL).flushdb()


def _wait_for_point(vw, domain: str, timeout: float) -> dict:
    def complete() -> dict | None:
        r = vw.cli("backups", domain, "--json")
        assert r.code == 0, r.err
        return next((p for p in r.json() if p["status"] == "complete"), None)

    def state() -> str:
        jobs = vw.cli("jobs", "--json", "--domain", domain).out
        logs = "\n".join(w.log.read_text()[-3000:] for w in vw.workers)
        return f"a complete restore point of {domain}; jobs: {jobs}\n{logs}"

    return wait_for(complete, timeout, state, poll=1)


def _events(vw, domain: str) -> list:
    from virtwarden.catalog import events

    cat = vw.catalog()
    try:
        return events.recent(cat, domain=domain)
    finally:
        cat.close()


def _event_jobs(vw, domain: str) -> list[dict]:
    r = vw.cli("jobs", "--json", "--domain", domain)
    assert r.code == 0, r.err
    return r.json()


@pytest.mark.libvirt
@pytest.mark.celery
def test_a_started_domain_is_backed_up_without_any_command(installation, guest_factory) -> None:
    vw, name = installation
    vw.start_worker()
    listener = ListenerProcess(vw)
    try:
        listener.wait_for("host local: reconciled (first contact)")
        guest_factory(disks=1, size_mib=16, name=name)  # defined, then started: libvirt says so
        point = _wait_for_point(vw, name, timeout=240)
        assert point["level"] == "full"
        jobs = _event_jobs(vw, name)
        assert [(j["kind"], j["requested_by"], j["params"]["policy"]) for j in jobs] == \
            [("backup", "event", "on-start")]
        kinds = [(e.kind, e.reconciled) for e in _events(vw, name)]
        assert ("domain.defined", False) in kinds and ("domain.started", False) in kinds
        listener.wait_for(f"job.completed of {name} on host local (backup ok)")  # JOB_COMPLETED is heard too
    finally:
        listener.stop()


def _define_tiny_domain(conn, workdir: Path, name: str):
    from tests.guests import domain_type

    workdir.mkdir(parents=True)
    disk = workdir / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    xml = (f"<domain type='{domain_type(conn)}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           f"<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>"
           f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
           f"<target dev='vda' bus='virtio'/></disk><controller type='usb' model='none'/>"
           f"<memballoon model='none'/></devices></domain>")
    return conn.defineXML(xml)


@pytest.mark.libvirt
@pytest.mark.celery
def test_a_libvirtd_restart_is_survived_and_what_it_hid_is_handled(installation, tmp_path) -> None:
    libvirt = need_module("libvirt")
    from tests.guests import _remove_domain

    uri2 = os.environ.get("VIRTWARDEN_TEST_HOST2_URI")
    need(bool(uri2) and HOST2_PID.exists(), "the second test host (VIRTWARDEN_TEST_HOST2_URI) is not set up")
    vw, name = installation
    vw.hosts = {"h2": {"uri": uri2}}
    vw.start_worker(["h2"])
    listener = ListenerProcess(vw)  # reconnects after 1 s, doubling (listener.backoff_min_seconds)
    conn = None
    try:
        pos = listener.wait_for("host h2: reconciled (first contact)")
        stop_host2_libvirtd()
        pos = listener.wait_for("host h2: connection to", after=pos)  # ... lost (end of file / I/O error)
        pos = listener.wait_for("next attempt in", after=pos)  # a reconnect failed: libvirtd is down
        # Freeze the listener while libvirtd comes back and a domain is defined and
        # started, so that it cannot reconnect in time to hear those events: only
        # reconciliation can find them. Its backoff timer runs on and fires on SIGCONT.
        os.killpg(listener.proc.pid, signal.SIGSTOP)
        try:
            conn = restart_host2(libvirt, uri2)
            _define_tiny_domain(conn, tmp_path / name, name).create()
        finally:
            os.killpg(listener.proc.pid, signal.SIGCONT)
        listener.wait_for("host h2: reconciled: ", after=pos, timeout=120)
        point = _wait_for_point(vw, name, timeout=240)
        assert point["level"] == "full"
        recorded = [(e.kind, e.reconciled) for e in _events(vw, name)]
        assert recorded[:2] == [("domain.defined", True), ("domain.started", True)], recorded
        assert [(j["kind"], j["requested_by"]) for j in _event_jobs(vw, name)] == [("backup", "event")]
    finally:
        listener.stop()
        if conn is not None:
            _remove_domain(conn, name)
            conn.close()


@pytest.mark.libvirt
@pytest.mark.celery
def test_a_hung_libvirtd_is_given_up_on_and_its_events_heard_again_once_it_answers(installation, tmp_path) -> None:
    """host2's libvirtd stopped (SIGSTOP: its socket still accepts, nothing answers) under
    the listener: keepalive closes the event connection and every reconnect gives up after
    the open timeout (before, the watcher waited inside libvirt's open for as long as
    libvirtd was stopped); once libvirtd answers, the watcher subscribes again and a
    domain started there is backed up."""
    libvirt = need_module("libvirt")
    from tests.guests import _remove_domain

    uri2 = os.environ.get("VIRTWARDEN_TEST_HOST2_URI")
    need(bool(uri2) and HOST2_PID.exists(), "the second test host (VIRTWARDEN_TEST_HOST2_URI) is not set up")
    vw, name = installation
    vw.hosts = {"h2": {"uri": uri2}}
    vw.extra["libvirt"] = {"open_timeout_seconds": 2, "keepalive_interval_seconds": 1, "keepalive_count": 2}
    vw.start_worker(["h2"])
    listener = ListenerProcess(vw)
    conn = None
    pid = int(HOST2_PID.read_text().strip())
    try:
        pos = listener.wait_for("host h2: reconciled (first contact)")
        os.kill(pid, signal.SIGSTOP)
        try:
            pos = listener.wait_for("host h2: connection to", after=pos, timeout=30)
            assert "keepalive timeout" in listener.text(pos)[:200], listener.text(pos)[:200]
            pos = listener.wait_for("did not answer within 2 s", after=pos, timeout=30)
            pos = listener.wait_for("did not answer within 2 s", after=pos, timeout=30)  # and again: it goes on trying
        finally:
            os.kill(pid, signal.SIGCONT)
        pos = listener.wait_for("host h2: connected to", after=pos, timeout=90)
        pos = listener.wait_for("host h2: reconciled", after=pos)
        conn = libvirt.open(uri2)
        _define_tiny_domain(conn, tmp_path / name, name).create()
        point = _wait_for_point(vw, name, timeout=240)
        assert point["level"] == "full"
        assert [(j["kind"], j["requested_by"]) for j in _event_jobs(vw, name)] == [("backup", "event")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        listener.stop()
        if conn is not None:
            _remove_domain(conn, name)
            conn.close()
