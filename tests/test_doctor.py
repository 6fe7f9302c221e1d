"""`virtwarden doctor` says plainly what a host has and what it lacks."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.libvirt


def test_doctor_passes_on_a_prepared_host(vw, libvirt_uri):
    r = vw.cli("doctor", "--json")
    assert r.code == 0, r.out + r.err
    checks = {c["name"]: c for c in r.json()}
    assert checks["libvirt on local"]["ok"] and "QEMU" in checks["libvirt on local"]["detail"]
    assert checks["backup API on local"]["ok"]
    assert checks["broker"]["ok"] and checks["catalog database"]["ok"] and checks["storage nfs"]["ok"]
    assert checks["qemu-img"]["ok"] and checks["qemu-nbd"]["ok"] and "qemu-nbd" in checks["qemu-nbd"]["detail"]


def test_doctor_names_what_is_missing(vw, libvirt_uri):
    vw.storage["gone"] = {"type": "nfs", "path": "/nonexistent/mount"}
    vw.hosts["far"] = {"uri": "qemu+tcp://127.0.0.1:1/system"}
    vw.extra["broker_url"] = "redis://127.0.0.1:1/0"
    r = vw.cli("doctor")
    assert r.code == 1
    assert "[MISSING] storage gone: storage 'gone': path /nonexistent/mount does not exist" in r.out
    assert "[MISSING] libvirt on far: host far: cannot connect to libvirt at qemu+tcp://127.0.0.1:1/system" in r.out
    assert "[MISSING] broker: broker redis://127.0.0.1:1/0 unreachable" in r.out
    assert "[     ok] libvirt on local" in r.out
