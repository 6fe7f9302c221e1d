"""The one guest a benchmark run uses: 64 MiB, one vCPU, no OS, one qcow2 virtio disk.

Its disk is filled and dirtied through the running VM's own block backend (HMP
``qemu-io -d ... "write -s FILE OFFSET LEN"``), so QEMU's dirty bitmaps see the writes
exactly like guest I/O. qemu-io reports in the domain's log, not through the monitor, so
a write counts once the log says ``wrote N/N bytes at offset O``.
"""
from __future__ import annotations

import os
import random
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu

MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 << 10  # qemu-img's default qcow2 cluster size
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


class GuestWriteError(RuntimeError):
    """qemu-io in the guest's QEMU refused or failed a write."""


@dataclass(frozen=True)
class Dirtied:
    pieces: int
    bytes: int  # what the guest wrote
    cluster_bytes: int  # the same extents rounded out to whole qcow2 clusters


def domain_type() -> str:
    return "kvm" if os.path.exists("/dev/kvm") else "qemu"


class BenchGuest:
    def __init__(self, conn: libvirt.virConnect, name: str, workdir: Path, disk_gib: float) -> None:
        self.conn = conn
        self.name = name
        self.workdir = workdir
        self.size = int(disk_gib * GiB) // CLUSTER * CLUSTER
        self.image = workdir / "vda.qcow2"
        self.dom: libvirt.virDomain | None = None

    # --- lifecycle ---------------------------------------------------------------
    def create(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(self.size)], check=True)
        self.dom = self.conn.defineXML(self._xml())
        self.dom.create()

    def remove(self) -> None:
        """Destroyed, checkpoint metadata dropped, undefined, log removed; idempotent."""
        try:
            dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            for cp in dom.listAllCheckpoints():
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        (QEMU_LOG_DIR / f"{self.name}.log").unlink(missing_ok=True)

    def _xml(self) -> str:
        return (f"<domain type='{domain_type()}'><name>{self.name}</name>"
                "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
                "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file={quoteattr(str(self.image))}/><target dev='vda' bus='virtio'/></disk>"
                "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")

    # --- writes ------------------------------------------------------------------
    def lose_checkpoint(self, name: str) -> None:
        """Delete checkpoint ``name`` with its bitmaps (a domain redefined, bitmaps lost):
        the next backup of the point that made it cannot be an incremental."""
        assert self.dom is not None
        self.dom.checkpointLookupByName(name).delete()

    def fill(self, length: int, chunk: int = 64 * MiB) -> None:
        """``length`` bytes of fresh random data from offset 0, ``chunk`` at a time."""
        for offset in range(0, length, chunk):
            self.write_random(offset, min(chunk, length - offset))

    def dirty(self, total: int, within: int, rng: random.Random, piece: int = MiB) -> Dirtied:
        """``total`` bytes of random data in ``piece``-sized writes at random 4 KiB-aligned
        offsets in the first ``within`` bytes (the data already there is overwritten, so
        the image does not grow from one repeat to the next), or over the whole disk when
        that is too small. Each piece has a slot of its own one cluster longer than
        itself, so no two pieces share a cluster and the rounding is exact."""
        slot = piece + CLUSTER
        count = total // piece
        slots_within = within // slot
        slots = rng.sample(range(slots_within if slots_within >= count else self.size // slot), count)
        rounded = 0
        for index in sorted(slots):
            offset = index * slot + rng.randrange(0, CLUSTER, 4096)
            self.write_random(offset, piece)
            rounded += (-(-(offset + piece) // CLUSTER) - offset // CLUSTER) * CLUSTER
        return Dirtied(count, count * piece, rounded)

    def write_random(self, offset: int, length: int) -> None:
        data = self.workdir / "chunk.bin"
        with open(data, "wb") as f:
            for done in range(0, length, 8 * MiB):
                f.write(os.urandom(min(8 * MiB, length - done)))
        try:
            self._qemu_io(f"write -s {data} {offset} {length}", f"wrote {length}/{length} bytes at offset {offset}\n")
        finally:
            data.unlink(missing_ok=True)

    def _qemu_io(self, command: str, confirmation: str) -> None:
        assert self.dom is not None, "create() the guest first"
        log = QEMU_LOG_DIR / f"{self.name}.log"
        start = log.stat().st_size
        qom = f"/machine/peripheral/{self._alias()}/virtio-backend"
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {qom} "{command}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if reply.strip():
            raise GuestWriteError(f"{self.name}: {command}: {reply.strip()}")
        deadline = time.monotonic() + 120
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if confirmation in text:
                return
            if "failed" in text.lower() or "error" in text.lower() or time.monotonic() > deadline:
                raise GuestWriteError(f"{self.name}: {command}: {text.strip() or 'no answer'}")
            time.sleep(0.01)

    def _alias(self) -> str:
        assert self.dom is not None
        disk = ET.fromstring(self.dom.XMLDesc(0)).find("devices/disk/alias")
        if disk is None:
            raise GuestWriteError(f"{self.name} is not running: its disk has no alias")
        return disk.get("name", "")
