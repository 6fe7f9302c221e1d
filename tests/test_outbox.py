"""Nothing queued is forgotten: a broker that goes away (and comes back empty, as a Redis
without persistence does) while a worker dies mid-backup delays the job and the slots
after it, it never drops them. A private Redis really stopped and started, a worker
really SIGKILLed, the real scheduler's tick.
"""
from __future__ import annotations

import textwrap
import time

import pytest
from virtwarden.catalog import jobs, slots
from virtwarden.catalog.store import Catalog

from tests.faults import PrivateRedis, parent_of, pause_env, stopped_at
from tests.harness import s3_storage_entry, wait_for
from virtwarden import config as config_module

pytestmark = pytest.mark.libvirt
MiB = 1024 * 1024

POLICY = """\
    apiVersion: virtwarden/v1
    kind: Policy
    metadata: {name: hourly}
    spec:
      selector: {domains: ["NAME"]}
      backup:
        target: s3
        schedule: "0 * * * *"
        timezone: UTC
"""


class Clock:
    def __init__(self, at: str) -> None:
        self.set(at)

    def set(self, at: str) -> None:
        from virtwarden.daemons.scheduler import parse_time

        self.now = parse_time(at, "test clock")

    def __call__(self):
        return self.now


@pytest.fixture
def private_redis(tmp_path):
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    yield broker
    broker.stop()


def test_a_broker_outage_and_a_dead_worker_lose_no_job_and_no_slot(vw, guest_factory, private_redis, s3_settings,
                                                                    tmp_path):
    from virtwarden.worker import celery_app

    from virtwarden.daemons.scheduler import Scheduler

    g = guest_factory(disks=1, size_mib=64)
    g.write_random("vda", 0, 24 * MiB)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "hourly.yaml").write_text(textwrap.dedent(POLICY).replace("NAME", g.name))
    vw.extra.update(policy_dir=str(pdir), broker_url=private_redis.url)
    vw.storage["s3"] = s3_storage_entry(s3_settings)  # 5 MiB parts: the image is five of them
    cfg = config_module.load(str(vw.write_config()), env={})
    celery_app.configure(cfg)
    cat = Catalog(cfg.catalog_url)
    clock = Clock("2030-01-10 10:00:05")
    scheduler = Scheduler(cfg, cat, clock=clock)

    faults = tmp_path / "faults"  # whichever worker takes the backup stops in its upload
    workers = [vw.start_worker(env=pause_env("storing", faults)), vw.start_worker(env=pause_env("storing", faults))]
    report = scheduler.tick()
    assert len(report.started) == 1
    job_id = report.started[0][1]
    owner = parent_of(stopped_at("storing", faults))
    dying = next(w for w in workers if w.proc.pid == owner)
    survivor = next(w for w in workers if w is not dying)  # idle; its sweeper keeps running

    private_redis.stop()  # the broker goes away, and with it every message it held
    dying.kill()  # the worker running the backup dies mid-copy
    wait_for(lambda: jobs.get(cat, job_id).state == "queued", 60, "the survivor's sweeper to reap the job")
    wait_for(lambda: b"wait for the broker" in survivor.log.read_bytes(), 60, "a send to fail")
    time.sleep(2)
    assert jobs.get(cat, job_id).state == "queued"  # no message anywhere: only the row knows

    private_redis.start()  # empty
    vw.start_worker()  # and a new worker, as after a maintenance window
    done = wait_for(lambda: (j := jobs.get(cat, job_id)).finished and j, 180, "the job to run after the outage")
    assert done.state == "succeeded", done.error
    assert done.attempts == 2

    for hour in ("11", "12"):  # the next two slots are not postponed behind anything
        clock.set(f"2030-01-10 {hour}:00:05")
        report = scheduler.tick()
        assert len(report.started) == 1, report.summary()
        next_id = report.started[0][1]
        finished = wait_for(lambda: (j := jobs.get(cat, next_id)).finished and j,  # noqa: B023 - waited for here
                            120, f"the {hour}:00 backup")
        assert finished.state == "succeeded", finished.error
        assert finished.result["level"] == "incremental"
    states = sorted((r.slot_at.strftime("%H"), r.state) for r in slots.listing(cat))
    assert states == [("10", "started"), ("11", "started"), ("12", "started")]
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["failed", "complete", "complete", "complete"]
