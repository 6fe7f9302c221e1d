"""Workers, schedulers and listeners report themselves in the catalog (catalog.services),
so a daemon that died is seen even when no job is waiting for it: real daemons, killed
and stopped for real."""
from __future__ import annotations

import os
import signal
import socket

import pytest
from virtwarden.catalog import services

from tests import forkserver
from tests.harness import wait_for

pytestmark = pytest.mark.libvirt


def _rows(vw) -> dict[tuple[str, str], services.ServiceView]:
    cat = vw.catalog()
    try:
        return {(r.kind, r.hosts): r for r in services.listed(cat)}
    finally:
        cat.close()


def _seen_ages(vw) -> dict[tuple[str, str, str], float]:
    from virtwarden.api.metrics import CatalogCollector

    cat = vw.catalog()
    try:
        families = [f for f in CatalogCollector(cat).collect() if f.name == "virtwarden_service_last_seen_age_seconds"]
        return {tuple(s.labels[k] for k in ("kind", "node", "hosts")): s.value for f in families for s in f.samples}
    finally:
        cat.close()


def _daemon(vw, *args: str):
    vw.write_config()
    env = {**os.environ, "VIRTWARDEN_CONFIG": str(vw.config_path)}
    env.pop("VIRTWARDEN_DATABASE_URL", None)
    return forkserver.spawn(["--log-level", "info", *args], env=env, out=vw.root / f"{args[0]}.log")


def _stop(proc) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(60)


def test_a_killed_worker_keeps_its_row_its_restart_takes_it_over_and_a_clean_stop_removes_it(vw):
    node = socket.gethostname()
    first = vw.start_worker(hosts=["local"])
    row = wait_for(lambda: _rows(vw).get(("worker", "local")), 60, "the worker's row")
    assert (row.node, row.pid) == (node, first.proc.pid)
    assert 0 <= _seen_ages(vw)[("worker", node, "local")] < 60

    listed = vw.cli("services", "--json", in_process=True)
    assert listed.code == 0 and [(r["kind"], r["hosts"], r["pid"], r["silent"]) for r in listed.json()] == [
        ("worker", ["local"], first.proc.pid, False)], listed.out
    assert "worker" in vw.cli("services", in_process=True).out

    first.kill()  # no clean stop: the row stays, and its age will grow until it alerts
    assert _rows(vw)[("worker", "local")].pid == first.proc.pid

    second = vw.start_worker(hosts=["local"])
    wait_for(lambda: _rows(vw)[("worker", "local")].pid == second.proc.pid, 60, "the restarted worker's row")
    assert list(_rows(vw)) == [("worker", "local")]  # the same row: one series per place

    second.stop()
    assert _rows(vw) == {} and _seen_ages(vw) == {}
    assert vw.cli("services", in_process=True).out.startswith("no worker, scheduler or listener is running")


def test_the_scheduler_and_the_listener_report_themselves_until_stopped(vw):
    scheduler = _daemon(vw, "scheduler")
    listener = _daemon(vw, "listen", "--host", "local")
    try:
        def both() -> dict | None:
            assert scheduler.poll() is None and listener.poll() is None, "a daemon exited: see its log"
            rows = _rows(vw)
            return rows if {("scheduler", ""), ("listener", "local")} <= set(rows) else None

        found = wait_for(both, 60, lambda: f"the daemons' rows: {sorted(_rows(vw))}")
        assert found[("scheduler", "")].pid == scheduler.pid and found[("listener", "local")].pid == listener.pid
        assert _stop(scheduler) == 0
        assert set(_rows(vw)) == {("listener", "local")}
        assert _stop(listener) == 0
        assert _rows(vw) == {}
    finally:
        for proc in (scheduler, listener):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
