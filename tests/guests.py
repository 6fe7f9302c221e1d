"""Real libvirt guests for tests, and helpers to check their disks bit for bit.

A pytest plugin: tests/conftest.py loads it with ``pytest_plugins = ["tests.guests"]``.

Guests have no operating system, which is enough for backups, snapshots, commits and
migration: a guest that must boot something gets SeaBIOS and a 512-byte boot sector that
prints a marker; every other guest gets QEMU's minimal firmware (qboot), which finds nothing
to boot and halts. SeaBIOS spends about 3 s of a core starting each guest on these nested
machines, qboot a few milliseconds: most of the suite's guests never need more. Guest writes are simulated
through the running VM's own block backend with HMP ``qemu-io``, so dirty bitmaps and
overlays see them exactly like guest I/O; every write is mirrored into a raw "shadow" image
per disk, so a test always knows what each disk must contain.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from tests.conftest import need

try:
    import libvirt
    import libvirt_qemu
except ImportError:  # the fixtures skip (or fail in CI) with the reason
    libvirt = libvirt_qemu = None

MiB = 1024 * 1024
URI = "qemu:///system"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
CHUNK = MiB


class GuestIOError(RuntimeError):
    """qemu-io inside the guest's QEMU refused or failed a request."""


# --- disks ------------------------------------------------------------------------------------

def images_equal(a, b, fmt_a: str | None = None, fmt_b: str | None = None,
                 force_share: bool = False) -> bool:
    """Same guest-visible content? ``qemu-img compare``: exit 0 equal, 1 different.

    Formats come from the suffix (.qcow2, .raw/.img) or from ``qemu-img info``; pass
    ``force_share=True`` (-U) for an image that a running QEMU holds locked.
    """
    cmd = ["qemu-img", "compare", "-f", fmt_a or image_format(a), "-F", fmt_b or image_format(b)]
    cmd += ["-U"] if force_share else []
    r = subprocess.run(cmd + [str(a), str(b)], capture_output=True, text=True)
    if r.returncode in (0, 1):
        return r.returncode == 0
    raise RuntimeError(f"{' '.join(cmd)} {a} {b} failed ({r.returncode}): {r.stderr.strip()}")


def image_format(path) -> str:
    suffix = Path(path).suffix
    if suffix in (".qcow2", ".raw", ".img"):
        return "raw" if suffix == ".img" else suffix[1:]
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["format"]


def marker_mbr(marker: bytes) -> bytes:
    """A 512-byte boot sector that prints ``marker`` on COM1 and halts.

    The BIOS loads it at 0000:7C00 (CS may be 0 or 07C0, so DS is set to 0 and the marker
    is addressed absolutely). QEMU's UART needs no set-up and never overflows, so the code
    just writes bytes to the data port.
    """
    if b"\0" in marker or len(marker) > 510 - 23 - 1:
        raise ValueError("marker must be at most 486 bytes without NUL")
    msg = 0x7C00 + 23  # the marker follows the 23 bytes of code
    code = bytes([
        0xFA,                          # 00 cli            no interrupts: hlt below is final
        0xFC,                          # 01 cld            lodsb counts upwards
        0x31, 0xC0,                    # 02 xor ax, ax
        0x8E, 0xD8,                    # 04 mov ds, ax     DS = 0
        0xBE, msg & 0xFF, msg >> 8,    # 06 mov si, msg
        0xBA, 0xF8, 0x03,              # 09 mov dx, 0x3F8  COM1 data port
        0xAC,                          # 12 next: lodsb    al = [ds:si++]
        0x84, 0xC0,                    # 13 test al, al
        0x74, 0x03,                    # 15 jz done        (17 + 3 = 20)
        0xEE,                          # 17 out dx, al
        0xEB, 0xF8,                    # 18 jmp next       (20 - 8 = 12)
        0xF4,                          # 20 done: hlt
        0xEB, 0xFD,                    # 21 jmp done       (23 - 3 = 20)
    ])
    assert len(code) == 23
    sector = code + marker + b"\0"
    return sector.ljust(510, b"\0") + b"\x55\xAA"  # the BIOS boots only with this signature


def make_marker_boot_disk(path, marker: bytes, size_mib: int = 64) -> Path:
    """A qcow2 disk of ``size_mib`` whose boot sector prints ``marker`` on COM1."""
    path = Path(path)
    raw = path.with_name(path.name + ".raw.tmp")
    try:
        _raw_image(raw, size_mib, marker_mbr(marker))
        _convert_to_qcow2(raw, path)
    finally:
        raw.unlink(missing_ok=True)
    return path


def _raw_image(path: Path, size_mib: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size_mib * MiB)  # sparse


def _convert_to_qcow2(raw: Path, qcow2: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True, capture_output=True)


# --- guests -----------------------------------------------------------------------------------

_domain_types: dict[str, str] = {}


def domain_type(conn) -> str:
    """'kvm' where this host runs KVM guests, else 'qemu' (TCG); never hard-coded."""
    uri = conn.getURI()
    if uri not in _domain_types:
        kind = "qemu"
        if os.path.exists("/dev/kvm"):
            try:
                conn.getDomainCapabilities(None, None, None, "kvm")
                kind = "kvm"
            except libvirt.libvirtError:
                pass
        _domain_types[uri] = kind
    return _domain_types[uri]


class Guest:
    """One test domain, its qcow2 disks (vda, vdb, ...) and their raw shadow images."""

    def __init__(self, conn, name: str, workdir: Path, targets: list[str], size_mib: int,
                 serial_path: Path | None):
        self.conn = conn
        self.name = name
        self.workdir = workdir
        self.size = size_mib * MiB
        self.disks = {t: workdir / f"{t}.qcow2" for t in targets}
        self.shadows = {t: workdir / f"{t}.shadow.raw" for t in targets}
        self.serial_path = serial_path
        self.dom = None  # the virDomain, once defined
        self.log_dir = QEMU_LOG_DIR  # where its libvirtd keeps QEMU's log (another host: elsewhere)

    def xml(self, flags: int = 0) -> str:
        return self.dom.XMLDesc(flags)

    def disk_path(self, target: str) -> Path:
        """The image this guest was created with (its base after an external snapshot)."""
        return self.disks[target]

    def shadow_copy(self, target: str, dest) -> Path:
        """Copy what ``target`` must contain right now, as a raw image, to ``dest``."""
        subprocess.run(["cp", "--sparse=always", str(self.shadows[target]), str(dest)], check=True)
        return Path(dest)

    def write(self, target: str, offset: int, length: int, pattern: int | None = None,
              data_file=None) -> None:
        """Write ``pattern`` bytes, or the first ``length`` bytes of ``data_file``, at ``offset``."""
        if (pattern is None) == (data_file is None):
            raise ValueError("give exactly one of pattern and data_file")
        self._check_range(target, offset, length)
        if pattern is not None:
            self._qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}", offset, length)
            self._shadow_write(target, offset, length, lambda n: bytes([pattern]) * n)
            return
        data_file = Path(data_file).resolve()
        if data_file.stat().st_size < length:
            raise ValueError(f"{data_file} is shorter than {length} bytes")
        self._qemu_io(target, f"write -s {data_file} {offset} {length}", offset, length)
        with open(data_file, "rb") as src:
            self._shadow_write(target, offset, length, src.read)

    def write_random(self, target: str, offset: int, length: int) -> None:
        """Write incompressible bytes (qemu-io has no random pattern: they go through a file)."""
        data = self.workdir / f"random-{secrets.token_hex(4)}.bin"
        try:
            with open(data, "wb") as f:
                for done in range(0, length, CHUNK):
                    f.write(os.urandom(min(CHUNK, length - done)))
            self.write(target, offset, length, data_file=data)
        finally:
            data.unlink(missing_ok=True)

    def zero(self, target: str, offset: int, length: int) -> None:
        self._check_range(target, offset, length)
        self._qemu_io(target, f"write -z {offset} {length}", offset, length)
        self._shadow_write(target, offset, length, bytes)

    def flush(self, target: str) -> None:
        """Make the running QEMU write out what it holds of ``target`` (qcow2 metadata
        included) so that another process reading the live image (``-U``) sees every write."""
        qom = f"/machine/peripheral/{self._alias(target)}/virtio-backend"
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {qom} "flush"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if reply.strip():
            raise GuestIOError(f"{self.name} {target}: flush: {reply.strip()}")

    def serial_log(self) -> bytes:
        """What the guest printed on its serial port so far (marker guests only)."""
        try:
            return self.serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_for_serial(self, marker: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while marker not in self.serial_log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # qemu-io answers through the monitor only for some errors (unknown device, permission
    # conflict); its report, I/O errors included, goes to the domain's log. So a write counts
    # only once the log shows "wrote N/N bytes at offset O".
    def _qemu_io(self, target: str, command: str, offset: int, length: int) -> None:
        qom = f"/machine/peripheral/{self._alias(target)}/virtio-backend"
        log = self.log_dir / f"{self.name}.log"
        start = log.stat().st_size
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {qom} "{command}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if reply.strip():
            raise GuestIOError(f"{self.name} {target}: {command}: {reply.strip()}")
        done = f"wrote {length}/{length} bytes at offset {offset}\n"
        deadline = time.monotonic() + 10
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if done in text:
                return
            if re.search(r"failed|error|No such file|cannot|invalid", text, re.I) or time.monotonic() > deadline:
                raise GuestIOError(f"{self.name} {target}: {command}: {text.strip() or 'no answer'}")
            time.sleep(0.01)

    def _alias(self, target: str) -> str:
        """The device id QEMU knows the disk by (e.g. virtio-disk0), from the live XML."""
        for disk in ET.fromstring(self.xml()).iterfind("devices/disk"):
            if disk.find("target").get("dev") == target:
                alias = disk.find("alias")
                if alias is None:
                    raise GuestIOError(f"{self.name} is not running: {target} has no alias")
                return alias.get("name")
        raise KeyError(f"{self.name} has no disk {target}")

    def _check_range(self, target: str, offset: int, length: int) -> None:
        if target not in self.disks:
            raise KeyError(f"{self.name} has no disk {target}")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside {target} ({self.size} bytes)")

    def _shadow_write(self, target: str, offset: int, length: int, chunk) -> None:
        with open(self.shadows[target], "r+b") as f:
            f.seek(offset)
            for done in range(0, length, CHUNK):
                n = min(CHUNK, length - done)
                data = chunk(n)
                if len(data) != n:
                    raise ValueError("data file ended early")
                f.write(data)


class GuestFactory:
    """``factory(disks=2, size_mib=64, start=True, name=None, boot_marker=None) -> Guest``.

    ``cleanup()`` removes every guest it made, wherever it ended up (the second test host
    too, after a migration): destroyed, checkpoint and snapshot metadata deleted, undefined,
    files removed.
    """

    def __init__(self, uri: str, root: Path):
        self.uri = uri
        self.root = root
        self.conn = libvirt.open(uri)
        self.guests: list[Guest] = []

    def __call__(self, disks: int = 2, size_mib: int = 64, start: bool = True,
                 name: str | None = None, boot_marker: bytes | None = None,
                 raw: tuple[str, ...] = (), qemu_user: tuple[int, int] | None = None) -> Guest:
        name = name or f"vwtest-{secrets.token_hex(4)}"
        workdir = self.root / name
        workdir.mkdir(parents=True)
        targets = [f"vd{chr(ord('a') + i)}" for i in range(disks)]
        serial = workdir / "serial.log" if boot_marker else None
        guest = Guest(self.conn, name, workdir, targets, size_mib, serial)
        self.guests.append(guest)  # from here on, cleanup() owns it
        for target in raw:  # raw images are their own shadow's copy; no bitmaps possible
            guest.disks[target] = workdir / f"{target}.img"
        for target in targets:
            # The shadow is the disk's initial content; the qcow2 is made from it.
            head = marker_mbr(boot_marker) if boot_marker and target == "vda" else b""
            _raw_image(guest.shadows[target], size_mib, head)
            if target in raw:
                shutil.copyfile(guest.shadows[target], guest.disks[target])
            else:
                _convert_to_qcow2(guest.shadows[target], guest.disks[target])
        if qemu_user is not None:  # QEMU runs as that user: it must reach the disks
            for directory in [workdir, *workdir.parents]:
                directory.chmod(directory.stat().st_mode | 0o001)
        guest.dom = self.conn.defineXML(self._domain_xml(guest, halt_at_once=boot_marker is None,
                                                         qemu_user=qemu_user))
        if start:
            guest.dom.create()
        return guest

    def _domain_xml(self, guest: Guest, halt_at_once: bool, qemu_user: tuple[int, int] | None = None) -> str:
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{image_format(path)}'/>"
            f"<source file={_attr(path)}/><target dev='{target}' bus='virtio'/></disk>"
            for target, path in guest.disks.items())
        serial = (f"<serial type='file'><source path={_attr(guest.serial_path)}/>"
                  f"<target port='0'/></serial>") if guest.serial_path else ""
        # No USB controller and no balloon: nothing a test does not need, faster to start.
        # A guest that boots its disk runs under TCG: SeaBIOS under KVM on these nested
        # machines costs about 2.8 s of a core in the host kernel's instruction emulation
        # per boot, under TCG 0.35 s (and 0.5 s to the marker instead of 3 s).
        # An unprivileged QEMU (``qemu_user``) runs under TCG too: /dev/kvm is root's here.
        kind = domain_type(self.conn) if halt_at_once and qemu_user is None else "qemu"
        return (f"<domain type='{kind}'><name>{guest.name}</name>"
                f"<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                f"<os><type arch='x86_64' machine='pc'>hvm</type>{_minimal_firmware() if halt_at_once else ''}"
                f"<boot dev='hd'/></os>"
                f"<on_crash>destroy</on_crash><devices>{disks}{serial}"
                f"<controller type='usb' model='none'/><memballoon model='none'/>"
                f"</devices>{_dac_label(qemu_user)}</domain>")

    def cleanup(self) -> None:
        errors = []
        if self.guests:
            for guest in self.guests:
                try:
                    _remove_domain(self.conn, guest.name)
                except libvirt.libvirtError as e:
                    errors.append(f"{guest.name} on {self.conn.getURI()}: {e}")
            host2 = os.environ.get("VIRTWARDEN_TEST_HOST2_URI")
            if host2:
                errors += _remove_from_host2(host2, [g.name for g in self.guests])
            for guest in self.guests:
                shutil.rmtree(guest.workdir, ignore_errors=True)
        self.guests.clear()
        if errors:
            raise RuntimeError("test guests left behind: " + "; ".join(errors))

    def close(self) -> None:
        self.cleanup()
        self.conn.close()


QBOOT = Path("/usr/share/qemu/qboot.rom")  # Debian's qemu-system-data, beside SeaBIOS


def _minimal_firmware() -> str:
    """The loader element of a guest that boots nothing: qboot where QEMU ships it (no
    loader, so SeaBIOS, elsewhere)."""
    return f"<loader type='rom'>{QBOOT}</loader>" if QBOOT.exists() else ""


def _attr(path) -> str:
    return "'" + escape(str(path), {"'": "&apos;"}) + "'"


def _remove_from_host2(uri: str, names: list[str], patience: float = 60) -> list[str]:
    """Remove ``names`` from the second host. Another test may be restarting its
    libvirtd right now (the host-fault tests do): a lost or refused connection is tried
    again until ``patience`` runs out. A host2 that never answers is not running, so no
    guest of ours can be there."""
    from tests.harness import wait_for

    left = list(names)

    def attempt() -> tuple[list[str]] | None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            return None  # refused: tried again
        errors = []
        try:
            for name in list(left):
                try:
                    _remove_domain(conn, name)
                    left.remove(name)
                except libvirt.libvirtError as e:
                    if e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE):
                        return None  # the connection was lost: tried again
                    errors.append(f"{name} on {uri}: {e}")
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        return (errors,)

    try:
        return wait_for(attempt, patience, f"{uri} to answer for the clean-up", poll=1)[0]
    except AssertionError:
        return []


def _remove_domain(conn, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    persistent = dom.isPersistent()
    if dom.isActive():
        dom.destroy()
    if not persistent:
        return  # a transient domain is gone once destroyed
    for checkpoint in dom.listAllCheckpoints():
        checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    for snapshot in dom.listAllSnapshots():
        snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                      | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                      | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                      | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    """The main test host's URI, once it is known to answer."""
    need(libvirt is not None, "libvirt-python is not installed")
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as e:
        need(False, f"cannot connect to {URI}: {e}")
    return URI


@pytest.fixture
def lan(libvirt_uri):
    """A network of this test's own for guests' interfaces: transient, with no forward and
    no address of the host (the host runs no network of its own a test could use)."""
    conn = libvirt.open(libvirt_uri)
    name = f"vwtest-{secrets.token_hex(4)}"
    net = conn.networkCreateXML(f"<network><name>{name}</name></network>")
    try:
        yield name
    finally:
        try:
            net.destroy()
        finally:
            conn.close()


QEMU_LOGS = Path("/var/log/libvirt/qemu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the end of each of its guests' QEMU logs: a guest that
    stopped on its own says why there (a crash, a signal, a shutdown), and nowhere else."""
    outcome = yield
    report = outcome.get_result()
    factory = getattr(item, "funcargs", {}).get("guest_factory")
    if report.when != "call" or not report.failed or factory is None:
        return
    for guest in factory.guests:
        log = QEMU_LOGS / f"{guest.name}.log"
        try:
            tail = log.read_text(errors="replace").splitlines()[-15:]
        except OSError as e:
            tail = [f"(no log: {e})"]
        state = "?"
        with contextlib.suppress(Exception):
            state = "running" if guest.dom.isActive() else "not running"
        report.sections.append((f"guest {guest.name} ({state}): {log}", "\n".join(tail)))


def _dac_label(user: tuple[int, int] | None) -> str:
    """A domain's own DAC label: its QEMU runs as that uid and gid (libvirt hands the
    disks to it), whoever qemu.conf's user is: an unprivileged QEMU on this test host."""
    if user is None:
        return ""
    return f"<seclabel type='static' model='dac' relabel='yes'><label>+{user[0]}:+{user[1]}</label></seclabel>"


@pytest.fixture
def guest_factory(libvirt_uri, tmp_path):
    factory = GuestFactory(libvirt_uri, tmp_path / "guests")
    try:
        yield factory
    finally:
        factory.close()
