"""The real-guest helpers do what later tests rely on."""
from __future__ import annotations

import os

import pytest

from tests.conftest import need
from tests.guests import MiB, domain_type, images_equal, libvirt

pytestmark = pytest.mark.libvirt


def test_guest_starts_and_stops(guest_factory):
    guest = guest_factory(disks=1)
    assert guest.dom.isActive()
    assert guest.name.startswith("vwtest-")
    guest.dom.destroy()
    assert not guest.dom.isActive()


def test_writes_reach_the_live_disks(guest_factory, tmp_path):
    guest = guest_factory(disks=2)
    guest.write("vda", 0, 1 * MiB, pattern=0x5A)
    guest.zero("vda", 64 * 1024, 4096)
    guest.write_random("vdb", 3 * MiB, 512 * 1024)
    guest.write("vdb", 10 * MiB + 512, 1536, pattern=0x01)  # not cluster-aligned
    guest.dom.destroy()  # QEMU has flushed everything to the qcow2 files

    for target in ("vda", "vdb"):
        assert images_equal(guest.disk_path(target), guest.shadow_copy(target, tmp_path / f"{target}.raw"))
    # and the comparison does see a difference
    assert not images_equal(guest.disk_path("vda"), tmp_path / "vdb.raw")


def test_failed_write_raises(guest_factory):
    guest = guest_factory(disks=1)
    with pytest.raises(ValueError):
        guest.write("vda", 64 * MiB - 512, 1024, pattern=1)  # past the end: refused before QEMU
    with pytest.raises(KeyError):
        guest.write("vdz", 0, 512, pattern=1)


def test_marker_guest_prints_its_marker(guest_factory):
    guest = guest_factory(disks=1, boot_marker=b"VWTEST-BOOT-OK\r\n")
    # Seen here: 4-5 s under (nested) KVM, well under 1 s under TCG.
    timeout = 20 if domain_type(guest.conn) == "kvm" else 60
    assert guest.wait_for_serial(b"VWTEST-BOOT-OK", timeout), guest.serial_log()
    assert guest.dom.isActive()  # halted in its loop, not crashed


def test_cleanup_removes_guest_checkpoints_and_files(guest_factory):
    guest = guest_factory(disks=1)
    guest.dom.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>")
    guest.write("vda", 0, 1 * MiB, pattern=0x11)
    guest.dom.checkpointCreateXML("<domaincheckpoint><name>cp2</name></domaincheckpoint>")
    stopped = guest_factory(disks=1, start=False)
    stopped.dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>")

    guest_factory.cleanup()

    for g in (guest, stopped):
        with pytest.raises(libvirt.libvirtError) as err:
            guest_factory.conn.lookupByName(g.name)
        assert err.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        assert not g.workdir.exists()


@pytest.mark.xdist_group("host2")  # host2 users share one xdist worker
def test_cleanup_follows_a_guest_migrated_to_host2(guest_factory):
    host2 = os.environ.get("VIRTWARDEN_TEST_HOST2_URI")
    need(bool(host2), "VIRTWARDEN_TEST_HOST2_URI is not set (scripts/testhost.sh writes it)")
    guest = guest_factory(disks=1)
    dest = libvirt.open(host2)
    try:
        # Both hosts see the same files, which libvirt cannot know: hence UNSAFE.
        guest.dom.migrate3(dest, {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"},
                           libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE)
        assert dest.lookupByName(guest.name).isActive()
        guest_factory.cleanup()
        assert guest.name not in [d.name() for d in dest.listAllDomains()]
    finally:
        dest.close()
