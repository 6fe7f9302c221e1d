"""The scheduler on a real catalog (SQLite and PostgreSQL), real libvirt domains, a real
Redis broker and a clock the test controls. No worker runs: the tests look at the job
rows and slot rows the scheduler leaves in the catalog."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete as sa_delete
from sqlalchemy import update as sa_update
from virtwarden.catalog import jobs, slots
from virtwarden.catalog.models import Job, ScheduleSlot
from virtwarden.catalog.store import Catalog

from tests import forkserver
from tests.harness import REPO, wait_for
from virtwarden import config as config_module

pytestmark = pytest.mark.libvirt

UTC = UTC


def T(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class FakeClock:
    def __init__(self, start: str) -> None:
        self.now = T(start)

    def __call__(self) -> datetime:
        return self.now

    def set(self, text: str) -> FakeClock:
        self.now = T(text)
        return self


class Setup:
    """An installation (vw), its guests (defined, not started) and one policy file."""

    def __init__(self, vw, guest_factory, policy: str, guests: int = 2) -> None:
        self.vw = vw
        self.prefix = f"vwsched-{secrets.token_hex(3)}"
        self.domains = [guest_factory(disks=1, size_mib=16, start=False, name=f"{self.prefix}-{chr(97 + i)}").name
                        for i in range(guests)]
        policies = vw.data_dir / "policies"
        policies.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(policy).replace("PREFIX", self.prefix)
        (policies / "test.yaml").write_text(text)
        # The schedulers' clocks are in January 2025: by the database's clock their slots
        # are past the history retention, which the schedulers' sweepers would prune.
        vw.extra["catalog"] = {"slots_days": None}

    def config(self, database_url: str | None = None) -> config_module.Config:
        if database_url:
            self.vw.extra["database_url"] = database_url
        cfg = config_module.load(str(self.vw.write_config()), env={})
        from virtwarden.worker import celery_app

        celery_app.configure(cfg)
        return cfg

    def scheduler(self, cfg: config_module.Config, clock: FakeClock):
        from virtwarden.daemons.scheduler import Scheduler

        return Scheduler(cfg, Catalog(cfg.catalog_url), clock=clock)

    def cli(self, *args: str, now: str) -> subprocess.CompletedProcess:
        self.vw.write_config()
        env = {**os.environ, "VIRTWARDEN_CONFIG": str(self.vw.config_path), "VIRTWARDEN_SCHEDULER_NOW": now}
        env.pop("VIRTWARDEN_DATABASE_URL", None)
        env.pop("VIRTWARDEN_BROKER_URL", None)
        code, out, err = forkserver.run(list(args), env=env, out=self.vw.root / "scheduler-cli.out",
                                        err=self.vw.root / "scheduler-cli.err", timeout=300)
        return subprocess.CompletedProcess(args, code, out, err)


def slot_jobs(cat: Catalog) -> dict[tuple[str, str, str], jobs.JobView]:
    """The scheduler's jobs by (kind, domain, slot time) from their dedup keys, checking
    that no slot has two."""
    found: dict[tuple[str, str, str], jobs.JobView] = {}
    for job in jobs.recent(cat, limit=1000):
        assert job.requested_by == "scheduler"
        with cat.session() as s:
            from virtwarden.catalog.models import Job

            key = s.get(Job, job.id).dedup_key
        _, policy, kind, domain, at = key.split(":", 4)
        slot_at = datetime.fromisoformat(at).strftime("%H:%M")
        assert (kind, domain, slot_at) not in found, f"two jobs for one slot: {key}"
        found[(kind, domain, slot_at)] = job
    return found


def rows(cat: Catalog) -> dict[tuple[str, str, str], slots.SlotRow]:
    return {(r.job, r.domain, r.slot_at.strftime("%H:%M")): r for r in slots.listing(cat)}


def finish(cat: Catalog, job: jobs.JobView) -> None:
    """What a worker would do with the job (none runs in these tests)."""
    taken = jobs.claim(cat, job.id, "test-worker", 60, lock_domain=False)
    assert taken.ok
    assert jobs.finish(cat, taken.fence, ok=True, result={})


HOURLY = """\
    apiVersion: virtwarden/v1
    kind: Policy
    metadata: {name: hourly}
    spec:
      selector: {domains: ["PREFIX-*"]}
      backup: {target: nfs, schedule: "0 * * * *", window: 20m}
    """


def test_a_window_makes_one_job_per_slot_and_domain(vw, guest_factory):
    setup = Setup(vw, guest_factory, HOURLY)
    vw.hosts["gone"] = {"uri": "qemu+tcp://127.0.0.1:1/system"}  # unreachable: left out, the rest goes on
    cfg = setup.config()
    clock = FakeClock("2025-01-10 10:00:05")
    sched = setup.scheduler(cfg, clock)
    a, b = setup.domains
    first = sched.tick()
    assert "gone" in first.unreachable and len(first.started) == 2
    for minutes in range(5, 60, 5):  # every tick inside and after the window: nothing new
        clock.now = T("2025-01-10 10:00:05") + timedelta(minutes=minutes)
        assert sched.tick().started == []
    cat = sched.cat
    for job in slot_jobs(cat).values():
        finish(cat, job)
    for t in ("11:00:00", "11:00:30", "11:10:00", "11:30:00"):
        clock.set(f"2025-01-10 {t}")
        sched.tick()
    found = slot_jobs(cat)
    assert sorted(found) == [("backup", a, "10:00"), ("backup", a, "11:00"), ("backup", b, "10:00"),
                             ("backup", b, "11:00")]
    job = found[("backup", a, "11:00")]
    assert (job.kind, job.domain, job.host, job.state) == ("backup", a, "local", "queued")
    assert job.params == {"domain": a, "storage": "nfs", "strategy": "bitmap", "full_every": 7, "force_full": False,
                          "policy": "hourly", "retention": None, "quiesce": "auto"}
    recorded = rows(cat)
    assert len(recorded) == 4 and {r.state for r in recorded.values()} == {"started"}
    assert {(k, r.job_id) for k, r in recorded.items()} == {(k, j.id) for k, j in found.items()}
    assert recorded[("backup", a, "11:00")].window_end == T("2025-01-10 11:20")
    # A policy file broken while the scheduler runs: it says so and finds slots with the
    # policies it had; a backup's settings need the files, so its slot waits for the fix.
    for d in (a, b):
        finish(cat, found[("backup", d, "11:00")])
    (vw.data_dir / "policies" / "broken.yaml").write_text("apiVersion: virtwarden/v1\nkind: Policy\n")
    clock.set("2025-01-10 12:00:10")
    report = sched.tick()
    assert not report.ok and "broken.yaml" in report.problems[0]
    assert report.started == [] and rows(cat)[("backup", a, "12:00")].state == "deferred"
    assert "broken.yaml:1: metadata: Field required" in rows(cat)[("backup", a, "12:00")].reason
    (vw.data_dir / "policies" / "broken.yaml").unlink()
    clock.set("2025-01-10 12:00:40")
    report = sched.tick()
    assert report.problems == [] and len(report.started) == 2


def test_a_tick_with_nothing_due_lists_no_host_but_those_that_did_not_answer(vw, guest_factory):
    """Slot instants depend on the schedules only: a tick that finds none since the hosts
    were last listed, with no slot waiting, does not ask their libvirt for the domains;
    a host that did not answer is tried alone (its bounded timeout, not the fleet's
    listing), so that its slots start once it answers. A slot coming due, or one waiting
    for a limit, makes the next ticks list every host again."""
    setup = Setup(vw, guest_factory, HOURLY.replace("window: 20m", "window: 20m, max_parallel_per_host: 1"))
    vw.hosts["gone"] = {"uri": "qemu+tcp://127.0.0.1:1/system"}  # never answers
    sched = setup.scheduler(setup.config(), clock := FakeClock("2025-01-10 10:00:05"))
    listings: list[list[str] | None] = []
    listed = sched.hosts.domains
    sched.hosts.domains = lambda only=None, **kw: (listings.append(only), listed(only, **kw))[1]  # type: ignore[method-assign]
    a, b = setup.domains
    report = sched.tick()
    assert not report.quiet and listings == [None] and "gone" in report.unreachable  # the first tick lists all
    assert rows(sched.cat)[("backup", b, "10:00")].state == "deferred"  # one at a time on the host
    clock.set("2025-01-10 10:05:00")
    assert not sched.tick().quiet and listings[-1] is None  # b's slot waits: all listed, still deferred
    finish(sched.cat, slot_jobs(sched.cat)[("backup", a, "10:00")])
    clock.set("2025-01-10 10:10:00")
    assert [k.split(":")[3] for k, _ in sched.tick().started] == [b]
    finish(sched.cat, slot_jobs(sched.cat)[("backup", b, "10:00")])
    del listings[:]
    for t in ("10:15:00", "10:40:00", "10:59:59"):
        report = clock.set(f"2025-01-10 {t}") and sched.tick()
        assert report.quiet and report.retried == ["gone"] and "gone" in report.unreachable
        assert "only 1 host(s) that had not answered listed" in report.summary()
    assert listings == [["gone"]] * 3  # local, whose domains were listed before, was not asked again
    clock.set("2025-01-10 11:00:01")
    assert not sched.tick().quiet and listings[-1] is None
    assert sorted(k[1:] for k in slot_jobs(sched.cat)) == [(a, "10:00"), (a, "11:00"), (b, "10:00")]
    del vw.hosts["gone"]  # a fleet that answers: quiet ticks list nothing at all
    finish(sched.cat, slot_jobs(sched.cat)[("backup", a, "11:00")])
    sched = setup.scheduler(setup.config(), clock.set("2025-01-10 11:10:00"))
    assert [k.split(":")[3] for k, _ in sched.tick().started] == [b]
    finish(sched.cat, slot_jobs(sched.cat)[("backup", b, "11:00")])
    report = clock.set("2025-01-10 11:15:00") and sched.tick()
    assert report.quiet and report.retried == [] and "no host listed" in report.summary()


VERIFIED = """\
    apiVersion: virtwarden/v1
    kind: Policy
    metadata: {name: verified}
    spec:
      selector: {domains: ["PREFIX-*"]}
      backup: {target: nfs}
      verify:
        schedule: "0 12 * * 0"
        timezone: Europe/Paris
        window: 1h
        sample_percent: 25
        max_parallel: 1
    """


def test_verify_slots_start_verify_jobs_with_the_policys_sample_one_at_a_time(vw, guest_factory):
    setup = Setup(vw, guest_factory, VERIFIED)
    cfg = setup.config()
    clock = FakeClock("2025-01-12 11:00:05")  # a Sunday: 12:00 in Paris is 11:00 UTC
    sched = setup.scheduler(cfg, clock)
    cat = sched.cat
    a, b = setup.domains
    report = sched.tick()
    assert [k.split(":")[2:4] for k, _ in report.started] == [["verify", a]]
    job = slot_jobs(cat)[("verify", a, "11:00")]
    assert (job.kind, job.domain, job.host, job.state) == ("verify", a, "local", "queued")
    assert job.params == {"domain": a, "storage": None, "sample_percent": 25, "policy": "verified"}
    assert rows(cat)[("verify", b, "11:00")].reason == ("policy verified already has 1 verify job(s) queued or"
                                                        " running (at most 1)")
    finish(cat, job)
    clock.set("2025-01-12 11:30:00")
    assert [k.split(":")[2:4] for k, _ in sched.tick().started] == [["verify", b]]
    clock.set("2025-01-12 12:00:00")  # past the window: nothing new until next Sunday
    assert sched.tick().started == []
    assert rows(cat)[("verify", b, "11:00")].window_end == T("2025-01-12 12:00")


def test_limits_defer_and_a_closed_window_skips(vw, guest_factory):
    setup = Setup(vw, guest_factory, HOURLY.replace("window: 20m", "window: 20m, max_parallel_per_host: 1"))
    cfg = setup.config()
    clock = FakeClock("2025-01-10 10:00:05")
    sched = setup.scheduler(cfg, clock)
    cat = sched.cat
    a, b = setup.domains
    report = sched.tick()
    assert [k.split(":")[3] for k, _ in report.started] == [a]
    assert rows(cat)[("backup", b, "10:00")].reason == ("host local already has 1 backup job(s) queued or running"
                                                        " (max_parallel_per_host 1 in policy hourly)")
    assert slot_metrics(cat)[1] == {("backup",): 1}
    finish(cat, slot_jobs(cat)[("backup", a, "10:00")])
    clock.set("2025-01-10 10:05:00")
    assert [k.split(":")[3] for k, _ in sched.tick().started] == [b]  # the deferred slot, window still open
    clock.set("2025-01-10 11:00:10")  # b's 10:00 job still queued: a's 11:00 waits for the host
    assert sched.tick().started == []
    for t in ("11:10:00", "11:20:00"):
        clock.set(f"2025-01-10 {t}")
        sched.tick()
    recorded = rows(cat)
    assert [recorded[("backup", d, "11:00")].state for d in (a, b)] == ["skipped", "skipped"]
    assert recorded[("backup", a, "11:00")].reason == (
        "window closed at 2025-01-10 11:20:00Z before the backup could start (it waited: host local already has"
        " 1 backup job(s) queued or running (max_parallel_per_host 1 in policy hourly))")
    assert sorted(slot_jobs(cat)) == [("backup", a, "10:00"), ("backup", b, "10:00")]
    skipped, waiting = slot_metrics(cat)
    assert {k: v for k, v in skipped.items() if v} == {("backup", "waited"): 2}
    assert len(skipped) == 4 * 3 and waiting == {}  # every job kind and cause from zero; none waits now


def slot_metrics(cat) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]:
    """What /metrics says of slots: skipped totals by (job, cause), deferred by job."""
    from virtwarden.api.metrics import CatalogCollector

    families = {f.name: f for f in CatalogCollector(cat).collect()}
    return ({tuple(x.labels.values()): x.value for x in families["virtwarden_skipped_slots"].samples},
            {tuple(x.labels.values()): x.value for x in families["virtwarden_deferred_slots"].samples})


def test_a_broker_outage_or_a_scheduler_crash_loses_no_slot(vw, guest_factory):
    """Slots that come due while the broker is down start all the same: their jobs are
    queued and sent by the sweeper once the broker is back (a broker outage delays
    jobs, it never drops them)."""
    setup = Setup(vw, guest_factory, HOURLY)
    a, b = setup.domains
    good = setup.config()
    down = good.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    clock = FakeClock("2025-01-10 10:00:05")
    from virtwarden.worker import celery_app

    celery_app.configure(down)
    report = setup.scheduler(down, clock).tick()
    assert len(report.started) == 2 and report.resent == []
    cat = Catalog(good.catalog_url)
    queued = jobs.recent(cat)
    assert [(j.state, j.sends) for j in queued] == [("queued", 0), ("queued", 0)]  # created, never sent
    # A scheduler that died after marking b's slot started but before creating its job:
    b_row = rows(cat)[("backup", b, "10:00")]
    with cat.session() as s:
        s.execute(sa_delete(Job).where(Job.id == b_row.job_id))
        s.execute(sa_update(ScheduleSlot).where(ScheduleSlot.id == b_row.id).values(job_id=None))
    celery_app.configure(good)
    clock.set("2025-01-10 10:01:00")
    report = setup.scheduler(good, clock).tick()  # the broker is back; a restarted scheduler
    a_job = rows(cat)[("backup", a, "10:00")].job_id
    assert report.resent == [a_job]  # the sweeper sent the job made during the outage
    assert [j.sends for j in jobs.recent(cat)] == [1, 1]  # and b's new job was sent when made
    assert sorted(slot_jobs(cat)) == [("backup", a, "10:00"), ("backup", b, "10:00")]
    assert {r.state for r in rows(cat).values()} == {"started"}
    assert all(r.job_id for r in rows(cat).values())


@pytest.mark.parametrize("slot_batch", [500, 2], ids=["one-batch", "three-batches"])
def test_a_broker_lost_in_the_middle_of_a_batchs_sends_loses_no_job(vw, guest_factory, monkeypatch, slot_batch):
    """Six slots start in one batch; their messages go over one connection, two to a
    pipelined write. The broker goes away in the second write, after taking its messages
    and before answering. Every slot still has its job; the first two jobs count as sent,
    the other four (the two the broker took and did not confirm among them) stay queued
    and due, and the next tick's sweeper sends them once the broker is back: every job's
    message reaches the queue, some twice (which a job's lease makes harmless).

    With batches of two slots, each batch's messages are sent from the tick's sending
    thread while the next batch's transaction runs: the third batch's send may find the
    broker again or not, and nothing is lost either way."""
    import redis
    from virtwarden.worker import celery_app

    from tests.faults import CuttableProxy
    from virtwarden.daemons import scheduler as scheduler_module

    monkeypatch.setattr(celery_app, "PUBLISH_BATCH", 2)
    monkeypatch.setattr(scheduler_module, "BATCH", slot_batch)
    setup = Setup(vw, guest_factory, HOURLY, guests=6)
    good = setup.config()
    clock = FakeClock("2025-01-10 10:00:05")
    with CuttableProxy(6379) as proxy:
        through = good.model_copy(update={"broker_url": proxy.url(good.broker_url)})
        celery_app.configure(through)
        proxy.cut_after(b"\r\nLPUSH\r\n", 3)  # kombu publishes a message with one LPUSH
        report = setup.scheduler(through, clock).tick()
    cat = Catalog(good.catalog_url)
    assert len(report.started) == 6 and {r.state for r in rows(cat).values()} == {"started"}
    made = slot_jobs(cat)
    assert len(made) == 6 and all(r.job_id for r in rows(cat).values())
    sends = sorted(j.sends for j in jobs.recent(cat))
    taken = [m.decode() for m in redis.Redis.from_url(good.broker_url).lrange(celery_app.queue_for("local"), 0, -1)]
    if slot_batch == 500:
        assert sends == [0, 0, 0, 0, 1, 1], sends  # the first write went and was answered; the second was cut
        assert 3 <= len(taken) <= 4, len(taken)  # the cut write's messages reached the broker, unconfirmed
    else:
        assert sends.count(0) >= 2 and sends.count(1) >= 2, sends  # the second batch's write was cut
    unsent = {j.id for j in jobs.recent(cat) if j.sends == 0}
    celery_app.configure(good)
    clock.set("2025-01-10 10:01:00")
    report = setup.scheduler(good, clock).tick()  # the broker is back
    assert unsent <= set(report.resent)
    assert all(j.sends >= 1 and j.state == "queued" for j in jobs.recent(cat))
    queued = [m.decode() for m in redis.Redis.from_url(good.broker_url).lrange(celery_app.queue_for("local"), 0, -1)]
    assert all(any(job.id in m for m in queued) for job in made.values())  # every job's message is there


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, vw):
    if request.param == "sqlite":
        return None  # the installation's own SQLite file
    return request.getfixturevalue("pg_schema_url")


def test_concurrent_schedulers_start_each_slot_once(vw, guest_factory, catalog_url):
    setup = Setup(vw, guest_factory, HOURLY, guests=3)
    cfg = setup.config(catalog_url)
    clock = FakeClock("2025-01-10 10:00:05")
    schedulers = [setup.scheduler(cfg, clock) for _ in range(4)]  # each with its own engine
    barrier = threading.Barrier(len(schedulers))
    reports, errors = [], []

    def tick(sched) -> None:
        try:
            barrier.wait(timeout=120)
            reports.append(sched.tick())
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    cat = schedulers[0].cat
    found = slot_jobs(cat)
    assert sorted(found) == sorted(("backup", d, "10:00") for d in setup.domains)
    assert sorted(j for r in reports for _, j in r.started) == sorted(j.id for j in found.values())
    assert {r.state for r in rows(cat).values()} == {"started"} and len(rows(cat)) == 3


def test_two_scheduler_processes_start_each_slot_once(vw, guest_factory):
    setup = Setup(vw, guest_factory, HOURLY, guests=3)
    setup.config()
    # The catalog exists, as in any installation that ran before (two processes creating
    # a fresh SQLite schema at the same instant is the catalog's own concern).
    vw.catalog().close()
    env = {**os.environ, "VIRTWARDEN_CONFIG": str(vw.config_path), "VIRTWARDEN_SCHEDULER_NOW": "2025-01-10T10:01:00Z"}
    env.pop("VIRTWARDEN_DATABASE_URL", None)
    procs = [subprocess.Popen([sys.executable, "-m", "virtwarden.cli", "scheduler", "--once"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = sum(int(out.split(": ")[1].split(" started")[0]) for out, _ in outs)
    cat = vw.catalog()
    assert sorted(slot_jobs(cat)) == sorted(("backup", d, "10:00") for d in setup.domains)
    assert started == 3


def test_missed_slots_run_while_their_window_is_open_and_are_skipped_after(vw, guest_factory):
    setup = Setup(vw, guest_factory, HOURLY.rstrip(" ") + '      snapshots: {schedule: "0 2 * * *"}\n', guests=1)
    (domain,) = setup.domains
    first = setup.cli("scheduler", "--once", now="2025-01-10T09:05:00Z")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("scheduler tick at 2025-01-10T09:05:00"), first.stdout
    cat = vw.catalog()
    # First run on an empty catalog: each schedule's latest slot. The 02:00 snapshot's
    # window (until the next slot, a day later) is open, so it starts now.
    assert sorted(slot_jobs(cat)) == [("backup", domain, "09:00"), ("snapshot", domain, "02:00")]
    for job in slot_jobs(cat).values():
        finish(cat, job)
    # Down until 11:30: the 10:00 and 11:00 windows (20 minutes) have closed.
    assert setup.cli("scheduler", "--once", now="2025-01-10T11:30:00Z").returncode == 0
    recorded = rows(cat)
    for slot_at in ("10:00", "11:00"):
        row = recorded[("backup", domain, slot_at)]
        assert (row.state, row.job_id) == ("skipped", None)
        assert row.reason == (f"missed while no scheduler saw it: window closed at 2025-01-10 {slot_at[:2]}:20:00Z"
                              " before the backup could start")
    assert {k: v for k, v in slot_metrics(cat)[0].items() if v} == {("backup", "missed"): 2}
    listed = vw.cli("schedule", "slots", "--state", "skipped", "--hours", "1000000", "--json")
    assert listed.code == 0, listed.err
    assert [(r["domain"], r["slot_at"][11:16]) for r in listed.json()] == [(domain, "11:00"), (domain, "10:00")]
    table = vw.cli("schedule", "slots", "--hours", "1000000").out
    assert "missed while no scheduler saw it" in table and "started" in table
    # Down again until 12:10: the 12:00 window is still open.
    assert setup.cli("scheduler", "--once", now="2025-01-10T12:10:00Z").returncode == 0
    assert rows(cat)[("backup", domain, "12:00")].state == "started"
    assert sorted(slot_jobs(cat)) == [("backup", domain, "09:00"), ("backup", domain, "12:00"),
                                      ("snapshot", domain, "02:00")]


def test_the_daemon_ticks_until_stopped(vw, guest_factory):
    setup = Setup(vw, guest_factory, HOURLY, guests=1)
    (domain,) = setup.domains
    vw.extra["scheduler"] = {"tick_seconds": 0.5}
    setup.config()
    vw.catalog().close()
    env = {**os.environ, "VIRTWARDEN_CONFIG": str(vw.config_path),
           "VIRTWARDEN_SCHEDULER_NOW": "2025-01-10T10:59:58Z"}  # its clock runs on from there
    env.pop("VIRTWARDEN_DATABASE_URL", None)
    log = vw.root / "scheduler.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "virtwarden.cli", "--log-level", "info", "scheduler"], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        cat = vw.catalog()
        wait_for(lambda: ("backup", domain, "11:00") in rows(cat) or proc.poll() is not None, 120,
                 "the 11:00 slot", poll=0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    recorded = rows(cat)
    assert recorded[("backup", domain, "10:00")].state == "skipped"  # its window closed at 10:20
    assert recorded[("backup", domain, "11:00")].state == "started", log.read_text()
    assert sorted(slot_jobs(cat)) == [("backup", domain, "11:00")]


PARIS = """\
    apiVersion: virtwarden/v1
    kind: Policy
    metadata: {name: paris}
    spec:
      selector: {domains: ["PREFIX-*"]}
      backup: {target: nfs, schedule: "30 2 * * *", timezone: Europe/Paris, window: 1h}
      snapshots: {schedule: "0 * * * *", timezone: Europe/Paris}
    """


def test_preview_lists_slots_across_dst_changes(vw, guest_factory):
    setup = Setup(vw, guest_factory, PARIS, guests=1)
    (domain,) = setup.domains
    spring = setup.cli("schedule", "preview", "--from", "2025-03-29T12:00:00Z", "--to", "2025-03-31T12:00:00Z",
                       "--json", now="2025-01-01T00:00:00Z")
    assert spring.returncode == 0, spring.stderr
    backups = [r for r in load_json(spring) if r["job"] == "backup"]
    assert [(r["at"], r["local"], r["window_end"]) for r in backups] == [
        ("2025-03-30T01:00:00Z", "2025-03-30T03:00:00+02:00", "2025-03-30T02:00:00Z"),  # 02:30 does not exist
        ("2025-03-31T00:30:00Z", "2025-03-31T02:30:00+02:00", "2025-03-31T01:30:00Z"),
    ]
    assert {(r["policy"], r["domain"], r["host"], r["timezone"]) for r in backups} == {
        ("paris", domain, "local", "Europe/Paris")}
    autumn = setup.cli("schedule", "preview", "--from", "2025-10-25T23:00:00Z", "--to", "2025-10-26T03:00:00Z",
                       "--json", now="2025-01-01T00:00:00Z")
    assert [(r["job"], r["at"], r["local"]) for r in load_json(autumn)] == [
        ("snapshot", "2025-10-25T23:00:00Z", "2025-10-26T01:00:00+02:00"),
        ("snapshot", "2025-10-26T00:00:00Z", "2025-10-26T02:00:00+02:00"),
        ("backup", "2025-10-26T00:30:00Z", "2025-10-26T02:30:00+02:00"),  # once, not again at 02:30+01:00
        ("snapshot", "2025-10-26T01:00:00Z", "2025-10-26T02:00:00+01:00"),  # the repeated hour, hourly job
        ("snapshot", "2025-10-26T02:00:00Z", "2025-10-26T03:00:00+01:00"),
    ]
    text = setup.cli("schedule", "preview", "--from", "2025-10-26T00:00:00Z", "--to", "2025-10-26T01:00:00Z",
                     now="2025-01-01T00:00:00Z")
    assert text.returncode == 0 and text.stdout.splitlines()[0].split() == [
        "TIME", "(UTC)", "LOCAL", "TIME", "POLICY", "JOB", "DOMAIN", "HOST", "WINDOW", "END", "(UTC)"]
    bad = setup.cli("schedule", "preview", "--from", "yesterday", now="2025-01-01T00:00:00Z")
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "virtwarden: error: --from: 'yesterday' is not an ISO time (e.g. 2025-03-30T00:00Z)")


def load_json(p: subprocess.CompletedProcess) -> list[dict]:
    import json

    return json.loads(p.stdout)


@pytest.mark.parametrize("selector, started", [
    ({"domains": ["db-*"]}, {"db-gold", "db-iron"}),
    ({"domains": ["db-*"], "metadata": {"tier": "gold"}}, {"db-gold"}),
])
def test_hosts_are_listed_by_name_unless_a_policy_selects_by_metadata(tmp_path, selector, started):
    """A tick lists each host's domain names in one call; only when some policy selects
    by metadata does it read every domain's XML (libvirt's test driver here, from a node
    file, with the broker away: the slots' jobs are created all the same)."""
    from tests.conftest import need_module

    need_module("libvirt")
    import yaml
    from virtwarden.policies.select import METADATA_NAMESPACE

    from virtwarden.daemons.scheduler import HostLister, Scheduler

    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(
        f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>{meta}</domain>"
        for name, meta in [
            ("db-gold", f"<metadata><vw:virtwarden xmlns:vw='{METADATA_NAMESPACE}'><vw:tier>gold</vw:tier>"
                        "</vw:virtwarden></metadata>"),
            ("db-iron", f"<metadata><vw:virtwarden xmlns:vw='{METADATA_NAMESPACE}'><vw:tier>iron</vw:tier>"
                        "</vw:virtwarden></metadata>"),
            ("web-1", "")]) + "</node>")
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(yaml.safe_dump({
        "apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "hourly"},
        "spec": {"selector": selector, "backup": {"target": "nfs", "schedule": "0 * * * *"}}}))
    (tmp_path / "virtwarden.yaml").write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "broker_url": "redis://127.0.0.1:9/0", "policy_dir": str(pdir),
        "hosts": {"t": {"uri": f"test://{node}"}},
        "storage": {"nfs": {"type": "nfs", "path": str(tmp_path / "repo"), "create": True}}}))
    cfg = config_module.load(str(tmp_path / "virtwarden.yaml"), env={})

    lister = HostLister(cfg)
    try:
        by_name, _ = lister.domains(metadata=False)
        with_xml, _ = lister.domains(metadata=True)
    finally:
        lister.close()
    assert sorted((f.name, f.host, f.metadata) for f in by_name["t"]) == [
        ("db-gold", "t", {}), ("db-iron", "t", {}), ("web-1", "t", {})]
    assert {f.name: f.metadata for f in with_xml["t"]} == {"db-gold": {"tier": "gold"},
                                                             "db-iron": {"tier": "iron"}, "web-1": {}}

    cat = Catalog(cfg.catalog_url)
    clock = [datetime(2026, 12, 7, 11, 59, 30, tzinfo=UTC)]
    sched = Scheduler(cfg, cat, clock=lambda: clock[0])
    try:
        sched.tick()
        clock[0] = datetime(2026, 12, 7, 12, 0, 5, tzinfo=UTC)
        report = sched.tick()
    finally:
        sched.hosts.close()
    # (the first tick started the 11:00 slots it found missed; the noon ones wait for them)
    assert {key.split(":")[3] for key, _ in report.started + report.deferred} == started, report.summary()
    cat.close()
