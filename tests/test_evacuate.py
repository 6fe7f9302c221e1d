"""Evacuation with two real libvirt hosts, real workers, Redis and a PostgreSQL catalog:
an Alertmanager alert for a host moves its running guests to the other host (and leaves
one too big for it, saying why), a repeated or flapping alert starts nothing new, the dry
run changes nothing, a migration that runs out of time is aborted, and a backup chain
goes on across moves and restores bit for bit.

Guests are evacuated from host2 (the second test host) to local: the main host may run
other suites' guests, which an evacuation of it would move.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from virtwarden.catalog import alerts as alert_rows
from virtwarden.catalog import jobs, moves
from virtwarden.catalog.models import Domain, Host

from tests.fleet import Fleet, fill_memory, fleet, resize_memory  # noqa: F401 - fleet is a fixture
from tests.guests import images_equal
from tests.harness import wait_for

# One xdist worker runs every test that uses host2 (evacuations move whatever runs there;
# the listener tests restart its libvirtd).
pytestmark = [pytest.mark.libvirt, pytest.mark.xdist_group("host2"), pytest.mark.cli_in_process]
MiB = 1024 * 1024

POLICY = """\
apiVersion: virtwarden/v1
kind: Policy
metadata: {name: sick-hosts}
spec:
  migration:
    on_alerts:
      - alertname: HostDown
        labels: {severity: critical}
    host_label: instance
    action: evacuate
    max_parallel: 2
    timeout: 2m
"""


def _policy(f: Fleet, text: str = POLICY) -> None:
    d = f.vw.root / "policies"
    d.mkdir(exist_ok=True)
    (d / "p.yaml").write_text(text)
    f.vw.extra["policy_dir"] = str(d)


def _alert(status: str, starts: str, *, instance: str = "127.0.0.1:9100", fingerprint: str = "f00dfeed") -> dict:
    ends = "0001-01-01T00:00:00Z" if status == "firing" else "2031-01-01T10:05:00.123456789Z"
    alert = {"status": status, "labels": {"alertname": "HostDown", "severity": "critical", "instance": instance},
             "annotations": {"summary": "host is failing"}, "startsAt": starts, "endsAt": ends,
             "generatorURL": "http://prometheus/graph", "fingerprint": fingerprint}
    return {"version": "4", "status": status, "receiver": "virtwarden", "groupKey": "{}:{alertname=\"HostDown\"}",
            "truncatedAlerts": 0, "groupLabels": {"alertname": "HostDown"}, "commonLabels": alert["labels"],
            "commonAnnotations": {}, "externalURL": "http://alertmanager", "alerts": [alert]}


def _on_host2(f: Fleet, guest_factory, n: int) -> list:
    guests = [guest_factory(disks=1, size_mib=16) for _ in range(n)]
    for g in guests:
        f.move(g.name, "local", "host2")
    return guests


def test_alert_moves_host2s_guests_and_leaves_one_too_big(fleet: Fleet, guest_factory) -> None:
    from virtwarden.alerts import receive

    f = fleet
    small = _on_host2(f, guest_factory, 2)
    big = guest_factory(disks=1, size_mib=16, start=False)
    resize_memory(big, 4096)
    big.dom.create()
    f.move(big.name, "local", "host2")
    _policy(f)
    f.vw.start_worker(hosts=["local"])
    f.vw.start_worker(hosts=["host2"])
    # local keeps most of its memory for itself: about 1 GiB stays free for guests, so
    # the 4 GiB guest cannot go there while the small ones can (the margins absorb what
    # other processes on this machine do meanwhile). The request carries the reserve.
    f.vw.hosts["local"]["memory_reserve_mib"] = max(0, f.free_mib("local") - 1024)
    cfg = f.config()

    first = receive(cfg, f.cat, _alert("firing", "2031-01-01T10:00:00.123456789Z"), "alertmanager")
    [a] = first["alerts"]
    assert (a["outcome"], a["action"], a["host"]) == ("started", "evacuate", "host2"), a
    job_id = a["job_id"]
    # The alert flaps (resolved and fired again: a new startsAt) while the job runs.
    flap = receive(cfg, f.cat, _alert("firing", "2031-01-01T10:01:00Z"), "alertmanager")["alerts"][0]
    assert (flap["outcome"], flap["job_id"]) == ("already-running", job_id), flap

    done = wait_for(lambda: (j := jobs.get(f.cat, job_id)).finished and j, 240, "the evacuation")
    # It fails on purpose: a running guest is still on the host.
    assert done.state == "failed" and big.name in done.error and "no room" in done.error, done.error
    assert "2 of 3 running domain(s) moved off host2" in done.error

    for g in small:
        assert f.running_on(g.name) == ["local"]
        assert not f.defined_on("host2", g.name)
    assert f.running_on(big.name) == ["host2"]

    rows = {r.domain: r for r in moves.for_job(f.cat, job_id)}
    for g in small:
        r = rows[g.name]
        assert (r.outcome, r.from_host, r.to_host) == ("succeeded", "host2", "local"), r
        assert r.downtime_ms is not None and r.finished_at is not None
    assert rows[big.name].outcome == "skipped" and "needs 4096 MiB of memory" in rows[big.name].reason
    with f.cat.session() as s:
        for g in small:
            assert s.get(Domain, g.dom.UUIDString()).host == "local"
        assert {h.name: h.state for h in s.query(Host)} == {"local": "up", "host2": "up"}

    # Alertmanager repeats the firing alert: recognised, nothing new starts.
    again = receive(cfg, f.cat, _alert("firing", "2031-01-01T10:00:00.123456789Z"), "alertmanager")["alerts"][0]
    assert (again["outcome"], again["job_id"]) == ("duplicate", job_id)
    assert len(jobs.active(f.cat, "evacuate", "host2")) == 0
    assert [j.kind for j in jobs.recent(f.cat)].count("evacuate") == 1

    # Resolved: recorded; nobody moves back.
    resolved = receive(cfg, f.cat, _alert("resolved", "2031-01-01T10:00:00.123456789Z"), "alertmanager")
    assert resolved["alerts"][0]["outcome"] == "resolved"
    occurrences = [r for r in alert_rows.recent(f.cat) if r.fingerprint == "f00dfeed"]
    assert [(r.status, r.job_id) for r in occurrences] == [("resolved", job_id), ("firing", job_id)]
    assert occurrences[0].resolved_at == datetime(2031, 1, 1, 10, 5, 0, 123456, tzinfo=UTC)
    for g in small:
        assert f.running_on(g.name) == ["local"]


def test_dry_run_changes_nothing_then_evacuate_waits_and_reports(fleet: Fleet, guest_factory) -> None:
    import redis

    from tests.harness import REDIS_URL

    f = fleet
    [g] = _on_host2(f, guest_factory, 1)
    off = guest_factory(disks=1, size_mib=16, start=False)  # stays on local, shut off: not ours to move
    f.vw.start_worker()

    r = f.vw.cli("evacuate", "host2", "--to", "local", "--dry-run", "--json")
    assert r.code == 0, r.err
    plan = r.json()
    assert plan["dry_run"] and plan["host"] == "host2" and plan["targets"] == ["local"]
    assert {m["domain"]: m["to"] for m in plan["moves"]}[g.name] == "local"
    assert off.name not in {m["domain"] for m in plan["moves"]}
    text = f.vw.cli("evacuate", "host2", "--dry-run")
    assert text.code == 0 and "dry run, nothing changed" in text.out and g.name in text.out, text.out
    assert f.running_on(g.name) == ["host2"]
    assert jobs.recent(f.cat) == [] and moves.recent(f.cat) == []
    with f.cat.session() as s:
        assert s.query(Host).count() == 0
    assert redis.Redis.from_url(REDIS_URL).llen("host.host2") == 0

    bad = f.vw.cli("evacuate", "host2", "--to", "host2", "--dry-run")
    assert bad.code == 2 and "onto itself" in bad.err
    unknown = f.vw.cli("evacuate", "hots2")
    assert unknown.code == 4 and "did you mean" in unknown.err.lower(), unknown.err

    r = f.vw.cli("evacuate", "host2", "--to", "local", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    out = r.json()
    assert out["state"] == "succeeded"
    mine = [m for m in out["migrations"] if m["domain"] == g.name]
    assert [(m["outcome"], m["to_host"]) for m in mine] == [("succeeded", "local")]
    assert f.running_on(g.name) == ["local"]
    hosts = f.vw.cli("hosts", "--json")
    assert hosts.code == 0, hosts.err
    listed = {h["name"]: h for h in hosts.json()}
    assert listed["local"]["state"] == listed["host2"]["state"] == "up"
    assert g.name in [x["name"] for x in listed["local"]["capacity"]["guests"] if x["running"]]
    assert listed["host2"]["capacity"]["cpus"] >= 1


def test_hosts_marks_an_unreachable_host_down(fleet: Fleet) -> None:
    f = fleet
    f.vw.hosts["gone"] = {"uri": "qemu+tcp://127.0.0.1:1/system", "group": "rack1", "shared_storage": True}
    r = f.vw.cli("hosts")
    assert r.code == 0, r.err
    assert "DOWN" in r.out and "gone: host gone: cannot connect" in r.out, r.out
    with f.cat.session() as s:
        row = s.get(Host, "gone")
        assert row.state == "down" and "cannot connect" in row.last_error and row.last_seen_at is None
    plan = f.vw.cli("evacuate", "host2", "--dry-run", "--json").json()
    assert plan["targets"] == ["local"]


def test_a_migration_that_runs_out_of_time_is_aborted_and_the_guest_stays(fleet: Fleet, guest_factory) -> None:
    from virtwarden.hypervisor.migrate import MigrationTimeout

    f = fleet
    g = guest_factory(disks=1, size_mib=16, start=False)
    fill_memory(g, 32)  # 32 MiB of real data at 1 MiB/s: far longer than the timeout
    g.dom.create()
    seen = []
    with pytest.raises(MigrationTimeout, match="did not finish within 3 s: aborted"):
        _move_with_timeout(f, g.name, seen)
    assert f.running_on(g.name) == ["local"]
    assert not f.defined_on("host2", g.name)
    assert any(p.total > 0 for p in seen)


def _move_with_timeout(f: Fleet, name: str, seen: list) -> None:
    from virtwarden.hypervisor.migrate import migrate

    with f.host("local") as s, f.host("host2") as d:
        migrate(s, d, name, timeout=3, unsafe=True, bandwidth_mib=1, on_progress=seen.append, poll=0.2)


def test_backup_chain_goes_on_across_moves_and_restores_bit_for_bit(fleet: Fleet, guest_factory, tmp_path) -> None:
    """full on local; the guest moves to host2; incremental there (its checkpoint
    redefined from the manifest, the bitmap came with the disk); back to local by an
    evacuation; incremental again; every point restores exactly."""
    f = fleet
    g = guest_factory(disks=2, size_mib=32)
    f.vw.start_worker()
    expected = []

    def backup() -> dict:
        r = f.vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
        assert r.code == 0, r.err
        d = tmp_path / f"expected-{len(expected)}"
        d.mkdir()
        expected.append({t: g.shadow_copy(t, d / f"{t}.raw") for t in ("vda", "vdb")})
        return r.json()

    g.write_random("vda", 0, 4 * MiB)
    g.write("vdb", MiB, MiB, pattern=0x5A)
    full = backup()
    assert full["host"] == "local" and full["result"]["level"] == "full"

    g.write("vda", 8 * MiB, MiB, pattern=0x11)
    g.write_random("vdb", 20 * MiB, 2 * MiB)
    f.move(g.name, "local", "host2")
    on2 = backup()
    assert on2["host"] == "host2", on2
    assert on2["result"]["level"] == "incremental", on2["result"]["reason"]
    assert "redefined on host2" in on2["result"]["reason"] and "moved from host local" in on2["result"]["reason"]

    r = f.vw.cli("evacuate", "host2", "--to", "local", "--wait")
    assert r.code == 0, r.err + r.out
    assert f.running_on(g.name) == ["local"]
    g.write("vda", 30 * MiB, 64 * 1024, pattern=0x22)  # the guest's own connection works again on local
    back = backup()
    assert back["host"] == "local" and back["result"]["level"] == "incremental", back["result"]["reason"]

    listed = f.vw.cli("backups", g.name, "--json").json()
    assert [p["level"] for p in listed] == ["full", "incremental", "incremental"]
    assert len({p["chain_id"] for p in listed}) == 1
    for i, point in enumerate(listed):
        out = tmp_path / f"restored-{i}"
        r = f.vw.cli("restore", g.name, "--point", point["id"], "--to-dir", str(out), "--wait")
        assert r.code == 0, r.err
        for t in ("vda", "vdb"):
            assert images_equal(out / f"{t}.qcow2", expected[i][t]), (i, t)


def test_a_lost_bitmap_after_a_move_means_a_full_that_says_why(fleet: Fleet, guest_factory, tmp_path) -> None:
    import libvirt

    f = fleet
    g = guest_factory(disks=1, size_mib=16)
    f.vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x31)
    assert f.vw.cli("backup", g.name, "--target", "nfs", "--wait").code == 0
    # The bitmap goes away with the checkpoint; then the guest moves.
    dom = libvirt.open("qemu:///system").lookupByName(g.name)
    for cp in dom.listAllCheckpoints():
        cp.delete(0)
    f.move(g.name, "local", "host2")
    r = f.vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert r.code == 0, r.err
    result = r.json()["result"]
    assert result["level"] == "full", result
    assert "redefining checkpoint" in result["reason"] and "failed" in result["reason"], result["reason"]


# --- the catalog side, without libvirt ---------------------------------------------------------
def test_a_domain_locked_by_an_evacuation_blocks_backups_until_released(tmp_path) -> None:
    from virtwarden.catalog.store import Catalog

    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    evac = jobs.create(cat, kind="evacuate", domain=None, host="a", params={})
    assert jobs.claim(cat, evac.id, "w1", 60, lock_domain=False).ok
    assert jobs.lock_domain(cat, "vm1", evac.id) is None
    assert jobs.lock_domain(cat, "vm1", evac.id) is None  # its own lock again: fine
    backup = jobs.create(cat, kind="backup", domain="vm1", host="a", params={})
    assert jobs.claim(cat, backup.id, "w2", 60, lock_domain=True).why == "domain-busy"
    other = jobs.create(cat, kind="evacuate", domain=None, host="a", params={})
    assert jobs.claim(cat, other.id, "w3", 60, lock_domain=False).ok
    assert jobs.lock_domain(cat, "vm1", other.id) == evac.id
    jobs.unlock_domain(cat, "vm1", evac.id)
    taken = jobs.claim(cat, backup.id, "w2", 60, lock_domain=True)
    assert taken.ok
    assert [j.id for j in jobs.active(cat, "evacuate", "a")] == [evac.id, other.id]
    moved = jobs.move(cat, taken.fence, "b", "domain left a", resend_after=60)
    assert moved is not None and (moved.state, moved.host, moved.attempts) == ("queued", "b", 0)
    assert jobs.move(cat, taken.fence, "b", "again", resend_after=60) is None  # not ours any more


def test_alerts_that_map_to_no_host_or_policy_are_recorded_and_start_nothing(vw, tmp_path) -> None:
    from virtwarden.catalog.store import Catalog

    from virtwarden import config as config_module
    from virtwarden.alerts import host_for, receive
    from virtwarden.errors import UsageError

    vw.hosts = {"kvm01": {"uri": "qemu+ssh://kvm01.example.com/system"},
                "kvm02": {"uri": "qemu+tcp://10.0.0.2/system"},
                "edge": {"uri": "qemu:///system"}}
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICY)
    vw.extra["policy_dir"] = str(policies)
    cfg = config_module.load(str(vw.write_config()), env={})
    assert host_for(cfg, "kvm01")[0] == "kvm01"
    assert host_for(cfg, "kvm01:9100")[0] == "kvm01"
    assert host_for(cfg, "kvm01.example.com:9100")[0] == "kvm01"
    assert host_for(cfg, "10.0.0.2:9100")[0] == "kvm02"
    assert host_for(cfg, "[::1]:9100") == (None, "'[::1]:9100' names no configured host (configured: edge, kvm01,"
                                                 " kvm02)")
    assert host_for(cfg, "10.0.0.3")[0] is None

    cat = Catalog(cfg.catalog_url)
    got = receive(cfg, cat, _alert("firing", "2031-02-01T00:00:00Z", instance="10.9.9.9:9100"), "am")
    assert got["alerts"][0]["outcome"] == "unmatched" and "names no configured host" in got["alerts"][0]["detail"]
    other = _alert("firing", "2031-02-01T00:00:00Z", fingerprint="other")
    other["alerts"][0]["labels"]["alertname"] = "DiskFull"
    assert receive(cfg, cat, other, "am")["alerts"][0]["outcome"] == "unmatched"
    warn = _alert("firing", "2031-02-01T00:00:00Z", instance="kvm01:9100", fingerprint="warn")
    warn["alerts"][0]["labels"]["severity"] = "warning"  # the policy wants critical
    assert receive(cfg, cat, warn, "am")["alerts"][0]["outcome"] == "unmatched"
    assert jobs.recent(cat) == []
    assert [r.action for r in alert_rows.recent(cat)] == [None, None, None]
    assert [r.host for r in alert_rows.recent(cat)] == [None, None, "kvm01"]  # named, for the record
    for bad in ({}, {"alerts": "x"}, {"alerts": [{"status": "firing"}]}):
        with pytest.raises(UsageError):
            receive(cfg, cat, bad, "am")
    assert datetime.now(UTC) - alert_rows.recent(cat)[0].received_at < timedelta(minutes=5)


def test_an_alert_whose_backups_find_the_broker_dead_asks_for_a_resend_that_backs_up_once(fleet: Fleet,
                                                                                         guest_factory) -> None:
    """A backup action whose submissions fail for a while (the broker is away) must not
    answer as if it were done: Alertmanager resends only on a 5xx (otherwise after its
    repeat interval, 4 h by default). The resend starts the backups, once."""
    from virtwarden.alerts import receive

    f = fleet
    [g] = _on_host2(f, guest_factory, 1)
    _policy(f, POLICY.replace("action: evacuate", "action: backup")
            + "  backup: {target: nfs}\n  selector: {domains: ['vwtest-*']}\n")
    live = f.vw.extra.get("broker_url")
    f.vw.extra["broker_url"] = "redis://127.0.0.1:1/0"  # nothing listens there
    dead = f.config()
    payload = _alert("firing", "2031-03-02T00:00:00Z", instance="host2")
    first = receive(dead, f.cat, payload, "alertmanager")
    [got] = first["alerts"]
    assert first["retry"] is True, first  # the API answers 503 for this
    assert got["action"] == "backup" and got["transient"], got
    assert [e["domain"] for e in got["errors"]] == [g.name] and "broker" in got["errors"][0]["error"], got
    assert jobs.recent(f.cat) == []
    [row] = alert_rows.recent(f.cat)
    assert row.job_id is None  # so that the resend acts
    assert row.outcome == "error" and g.name in row.detail and "broker" in row.detail

    if live is None:
        del f.vw.extra["broker_url"]
    else:
        f.vw.extra["broker_url"] = live
    cfg = f.config()
    again = receive(cfg, f.cat, payload, "alertmanager")
    [got] = again["alerts"]
    assert again["retry"] is False and (got["occurrence"], got["outcome"]) == ("repeated", "started"), got
    [mine] = [j for j in got["jobs"] if j["domain"] == g.name]
    f.vw.start_worker(hosts=["host2"])
    done = wait_for(lambda: (j := jobs.get(f.cat, mine["job_id"])).finished and j, 120, "the backup")
    assert done.state == "succeeded" and done.host == "host2", done.error
    assert receive(cfg, f.cat, payload, "alertmanager")["alerts"][0]["outcome"] == "duplicate"
    assert [j.kind for j in jobs.recent(f.cat, domain=g.name)] == ["backup"]
    [row] = alert_rows.recent(f.cat)
    assert (row.outcome, row.detail, row.job_id) == ("started", None, mine["job_id"])  # the repeat changed none


def test_an_alert_whose_policy_says_backup_backs_the_hosts_domains_up_once(fleet: Fleet, guest_factory) -> None:
    from virtwarden.alerts import receive

    f = fleet
    [g] = _on_host2(f, guest_factory, 1)
    _policy(f, POLICY.replace("action: evacuate", "action: backup")
            + "  backup: {target: nfs}\n  selector: {domains: ['vwtest-*']}\n")
    cfg = f.config()
    f.vw.start_worker(hosts=["host2"])
    payload = _alert("firing", "2031-03-01T00:00:00Z", instance="host2")
    got = receive(cfg, f.cat, payload, "alertmanager")["alerts"][0]
    assert (got["outcome"], got["action"], got["host"]) == ("started", "backup", "host2"), got
    [mine] = [j for j in got["jobs"] if j["domain"] == g.name]
    done = wait_for(lambda: (j := jobs.get(f.cat, mine["job_id"])).finished and j, 120, "the backup")
    assert done.state == "succeeded" and done.host == "host2", done.error
    assert done.result["level"] == "full"
    assert receive(cfg, f.cat, payload, "alertmanager")["alerts"][0]["outcome"] == "duplicate"
    assert [j.kind for j in jobs.recent(f.cat, domain=g.name)] == ["backup"]
    assert f.running_on(g.name) == ["host2"]
