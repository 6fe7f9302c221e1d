"""Two real libvirt hosts for evacuation and fleet tests: the main libvirtd ("local")
and the second one scripts/testhost.sh runs ("host2"), one group with shared storage
(both see the same files), a PostgreSQL catalog schema of the test's own and the
Redis broker of tests/harness.py.

Test guests are made on local (tests/guests.py) and moved with the product's own
migration; the guest factory's cleanup finds them on either host.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from virtwarden.catalog.store import Catalog

from tests.conftest import need
from tests.harness import REPO
from virtwarden import config as config_module

HOST2_URI = os.environ.get("VIRTWARDEN_TEST_HOST2_URI", "")
HOST2_PID = Path("/var/lib/virtwarden-testhost/host2/libvirtd.pid")
MiB = 1024 * 1024
URIS = {"local": "qemu:///system", "host2": HOST2_URI}


@dataclass
class Fleet:
    vw: object  # tests.harness.Installation
    url: str

    @cached_property
    def cat(self) -> Catalog:
        return Catalog(self.url)

    def config(self) -> config_module.Config:
        cfg = config_module.load(str(self.vw.write_config()), env={})
        from virtwarden.worker import celery_app

        celery_app.configure(cfg)
        return cfg

    def host(self, name: str):
        from virtwarden.hypervisor.libvirt_host import LibvirtHost

        return LibvirtHost(name, URIS[name])

    def running_on(self, domain: str) -> list[str]:
        """The hosts where ``domain`` runs now, as libvirt says."""
        from virtwarden.hypervisor.migrate import running_here

        found = []
        for name in URIS:
            with self.host(name) as hv:
                if running_here(hv, domain):
                    found.append(name)
        return found

    def defined_on(self, name: str, domain: str) -> bool:
        from virtwarden.hypervisor.domains import exists

        with self.host(name) as hv:
            return exists(hv, domain)

    def move(self, domain: str, src: str, dst: str, **kw) -> None:
        """Test set-up: put a guest on the other host with the product's migration."""
        from virtwarden.hypervisor.migrate import migrate

        with self.host(src) as s, self.host(dst) as d:
            migrate(s, d, domain, timeout=120, unsafe=True, **kw)

    def free_mib(self, name: str) -> int:
        from virtwarden.hypervisor.migrate import capacity

        with self.host(name) as hv:
            return capacity(hv).memory_free // MiB


@pytest.fixture
def fleet(vw, pg_schema_url):
    need(bool(HOST2_URI), "VIRTWARDEN_TEST_HOST2_URI is not set (scripts/testhost.sh writes it)")
    try:
        import libvirt

        libvirt.open(HOST2_URI).close()
    except Exception as e:  # noqa: BLE001
        need(False, f"the second test host {HOST2_URI} does not answer: {e}")
    vw.hosts = {"local": {"uri": URIS["local"], "group": "rack1", "shared_storage": True},
                "host2": {"uri": HOST2_URI, "group": "rack1", "shared_storage": True}}
    vw.extra["database_url"] = pg_schema_url
    found = Fleet(vw, pg_schema_url)
    yield found
    # Workers first (killed, as the vw fixture does): they hold connections to the schema
    # that is dropped next.
    vw.close(graceful=False)
    if "cat" in found.__dict__:
        found.cat.close()


def resize_memory(guest, mib: int) -> None:
    """Give a defined, shut-off test guest ``mib`` of memory (QEMU allocates it lazily:
    a guest without an OS touches almost none of it)."""
    xml = guest.dom.XMLDesc(0)
    xml = xml.replace("<memory unit='KiB'>65536</memory>", f"<memory unit='KiB'>{mib * 1024}</memory>")
    xml = xml.replace("<currentMemory unit='KiB'>65536</currentMemory>",
                      f"<currentMemory unit='KiB'>{mib * 1024}</currentMemory>")
    guest.dom = guest.conn.defineXML(xml)


def fill_memory(guest, size_mib: int = 32) -> None:
    """Make a defined, shut-off test guest start with ``size_mib`` of random bytes in its
    RAM (QEMU's generic loader device), so migrating it moves real data and can be
    slowed down with a bandwidth cap."""
    blob = guest.workdir / "ram.bin"
    blob.write_bytes(os.urandom(size_mib * MiB))
    xml = guest.dom.XMLDesc(0)
    xml = xml.replace("<domain type=", "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' type=", 1)
    xml = xml.replace("</domain>", "<qemu:commandline><qemu:arg value='-device'/>"
                                   f"<qemu:arg value='loader,file={blob},addr=0x1000000,force-raw=on'/>"
                                   "</qemu:commandline></domain>")
    guest.dom = guest.conn.defineXML(xml)



def stop_host2_libvirtd() -> None:
    """Stop host2's libvirtd only (never the main host's, never moto); its guests keep
    running and the next libvirtd reattaches to them."""
    pid = int(HOST2_PID.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def restart_host2(libvirt, uri: str):
    """``testhost.sh start`` starts what is missing (host2 here); it checks the other
    services too, and one of them answering slowly on a busy machine fails a run, so
    try again until host2 answers."""
    out = ""
    for _ in range(3):
        started = subprocess.run(["bash", "scripts/testhost.sh", "start"], cwd=REPO, capture_output=True,
                                 text=True, timeout=180)
        out += started.stdout + started.stderr
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            continue
    raise AssertionError(f"host2 did not come back after testhost.sh start:\n{out}")
