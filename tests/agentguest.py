"""Real Linux guests running qemu-guest-agent, for the tests of quiesce (and of anything
else that needs an agent that really answers, really freezes an ext4 filesystem and
really runs commands in the guest).

A pytest plugin (listed in tests/conftest.py). ``agent_guest_factory()`` defines and
starts a guest ``vwtest-<random>`` from the kernel and initramfs that
``scripts/testhost.sh install`` builds from Debian packages into ``AGENT_GUEST_DIR``
(see its "agent guest" section): TCG (``type='qemu'``: under KVM on these hosts a Linux
kernel hangs early), 256 MiB, one qcow2 virtio disk ``vda`` holding an ext4 filesystem
that the guest mounts on /mnt, the agent's virtio channel, and the serial console in a
file. It returns once the agent answers.

The guest writes back dirty data only when asked (``sync``, a filesystem freeze), and
qemu-ga logs verbosely to the serial console, where the freeze hook also writes
``vw-hook: freeze`` and ``vw-hook: thaw``. So a test can tell from the disk image, and
from the console, whether and when a freeze really happened.

Commands run through ``guest-exec`` with libvirt-qemu's agent passthrough (tests only:
libvirt marks such a domain tainted, which does not matter for a throwaway guest).
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from tests.conftest import need
from tests.guests import MiB, _remove_domain

try:
    import libvirt
    import libvirt_qemu
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # failures are reported as exceptions
except ImportError:  # libvirt_uri skips (or fails in CI) with the reason
    libvirt = libvirt_qemu = None

AGENT_GUEST_DIR = Path(os.environ.get("VIRTWARDEN_TEST_AGENT_GUEST_DIR",
                                      "/var/lib/virtwarden-testhost/agent-guest"))
READY = "vw-guest: ready"  # what the guest's /init prints before it starts qemu-ga
MOUNT = "/mnt"  # where the guest mounts vda's ext4 filesystem
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-core host


class AgentError(RuntimeError):
    """The agent refused, failed or did not answer a test's request."""


@dataclass
class ExecResult:
    exitcode: int
    out: str
    err: str


class AgentGuest:
    """One running guest with an agent. ``disk`` is vda's qcow2 image."""

    def __init__(self, conn, name: str, workdir: Path) -> None:
        self.conn = conn
        self.name = name
        self.workdir = workdir
        self.disk = workdir / "vda.qcow2"
        self.serial_path = workdir / "serial.log"
        self.dom = None

    # --- the agent ---------------------------------------------------------------------
    def agent(self, command: str, arguments: dict | None = None, timeout: int = 10):
        """Send one agent command; its ``return`` value. AgentError when it fails."""
        msg = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as e:
            raise AgentError(f"{self.name}: {command}: {e.get_error_message()}") from e
        return json.loads(reply)["return"]

    def answers(self, timeout: int = 2) -> bool:
        """Whether the agent answers a guest-ping now (within ``timeout`` seconds)."""
        self.dom.agentSetResponseTimeout(timeout, 0)
        try:
            self.agent("guest-ping", timeout=timeout)
            return True
        except AgentError:
            return False
        finally:
            self.dom.agentSetResponseTimeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)

    def wait_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise AgentError(f"{self.name}: the agent did not answer within {timeout:g}s\n"
                                 f"{self.serial_log()[-3000:]}")
            time.sleep(0.5)

    def freeze_status(self) -> str:
        return self.agent("guest-fsfreeze-status")

    # --- commands and files in the guest ------------------------------------------------
    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 30) -> ExecResult:
        """Run ``argv`` in the guest, wait for it, and return its exit code and output."""
        args = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.agent("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return ExecResult(st.get("exitcode", -1), _b64(st.get("out-data")), _b64(st.get("err-data")))
            if time.monotonic() > deadline:
                raise AgentError(f"{self.name}: {argv} still running after {timeout:g}s")
            time.sleep(0.1)

    def sh(self, script: str, timeout: float = 30) -> ExecResult:
        return self.run(["/bin/sh", "-c", script], timeout=timeout)

    def check_sh(self, script: str, timeout: float = 30) -> str:
        """Run a shell script in the guest; its output. AgentError unless it exits 0."""
        r = self.sh(script, timeout)
        if r.exitcode != 0:
            raise AgentError(f"{self.name}: {script!r} exited {r.exitcode}: {r.err.strip() or r.out.strip()}")
        return r.out

    def write_file(self, path: str, data: bytes, chunk: int = 16 * 1024) -> None:
        """Write ``data`` to ``path`` in the guest through the agent's file calls: into
        the guest's page cache, not synced (that is up to the test). For small files:
        the verbose agent echoes every byte it receives to the serial console, about
        0.1 s per 16 KiB under TCG; make bulk data in the guest with ``sh``."""
        handle = self.agent("guest-file-open", {"path": path, "mode": "w"})
        try:
            for at in range(0, len(data), chunk):
                part = data[at:at + chunk]
                done = self.agent("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(part).decode()})
                if done["count"] != len(part):
                    raise AgentError(f"{self.name}: short write to {path}: {done}")
        finally:
            self.agent("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        handle = self.agent("guest-file-open", {"path": path, "mode": "r"})
        out = b""
        try:
            while True:
                r = self.agent("guest-file-read", {"handle": handle, "count": MiB})
                out += base64.b64decode(r["buf-b64"])
                if r["eof"]:
                    return out
        finally:
            self.agent("guest-file-close", {"handle": handle})

    def agent_pid(self) -> int:
        return int(self.check_sh("cat /run/qemu-ga.child").strip())

    def stop_agent(self, seconds: float, delay: float = 1.0) -> None:
        """Make the agent stop answering for ``seconds`` (SIGSTOP, then SIGCONT), starting
        ``delay`` seconds from now (so that this request itself is answered first).
        Returns once the agent no longer answers."""
        from tests.harness import wait_for  # a plugin loaded after this one: imported late, rewritten

        pid = self.agent_pid()
        self.agent("guest-exec", {"path": "/bin/sh", "arg": [
            "-c", f"sleep {delay}; kill -STOP {pid}; sleep {seconds}; kill -CONT {pid}"]})
        sent = time.monotonic()

        def stopped() -> bool:
            # A ping missed before the STOP is due, or one missed once, is a busy guest
            # (TCG on a loaded host): only two misses in a row after the delay count.
            return time.monotonic() - sent >= delay and not self.answers(timeout=1) and not self.answers(timeout=1)

        wait_for(stopped, delay + 15, f"{self.name}'s agent to stop answering after kill -STOP", poll=0.2)

    def stall_next_freeze(self, seconds: int) -> None:
        """The next freeze request makes the agent hang for ``seconds`` before it freezes
        (its freeze hook sleeps): a freeze that is answered late, and then happens."""
        self.write_file("/run/freeze-stall", f"{seconds}\n".encode())

    # --- what the guest printed -------------------------------------------------------------
    def serial_log(self) -> str:
        """The serial console so far: kernel, ``vw-guest:`` and ``vw-hook:`` lines, qemu-ga's
        verbose log."""
        try:
            return self.serial_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def xml(self) -> str:
        return self.dom.XMLDesc(0)


def _b64(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""


def make_ext4_disk(path: Path, size_mib: int) -> None:
    """A qcow2 image holding one ext4 filesystem with 4 KiB blocks (so file data lies at
    4 KiB-aligned offsets of the image), fully initialised: the guest has no lazy
    initialisation writing behind a test's back."""
    raw = path.with_suffix(".raw.tmp")
    try:
        with open(raw, "wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "vwtest",
                        "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)], check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True, capture_output=True)
    finally:
        raw.unlink(missing_ok=True)


class AgentGuestFactory:
    """``factory(size_mib=64) -> AgentGuest``, running and answering. ``cleanup()``
    destroys and undefines every guest it made and removes its files."""

    def __init__(self, uri: str, root: Path) -> None:
        self.conn = libvirt.open(uri)
        self.root = root
        self.guests: list[AgentGuest] = []

    def __call__(self, size_mib: int = 64) -> AgentGuest:
        name = f"vwtest-{secrets.token_hex(4)}"
        workdir = self.root / name
        workdir.mkdir(parents=True)
        guest = AgentGuest(self.conn, name, workdir)
        self.guests.append(guest)  # from here on, cleanup() owns it
        make_ext4_disk(guest.disk, size_mib)
        guest.dom = self.conn.defineXML(_domain_xml(guest))
        guest.dom.create()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY not in guest.serial_log():
            if time.monotonic() > deadline or not guest.dom.isActive():
                raise AgentError(f"{name} did not boot within {BOOT_TIMEOUT:g}s:\n{guest.serial_log()[-3000:]}")
            time.sleep(0.2)
        guest.wait_answering(max(10.0, deadline - time.monotonic()))
        return guest

    def cleanup(self) -> None:
        errors = []
        for guest in self.guests:
            try:
                _remove_domain(self.conn, guest.name)
            except libvirt.libvirtError as e:
                errors.append(f"{guest.name}: {e}")
            shutil.rmtree(guest.workdir, ignore_errors=True)
        self.guests.clear()
        if errors:
            raise RuntimeError("agent guests left behind: " + "; ".join(errors))

    def close(self) -> None:
        try:
            self.cleanup()
        finally:
            self.conn.close()


def _attr(path: Path) -> str:
    return "'" + escape(str(path), {"'": "&apos;"}) + "'"


def _domain_xml(guest: AgentGuest) -> str:
    return (
        f"<domain type='qemu'><name>{guest.name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{escape(str(AGENT_GUEST_DIR / 'vmlinuz'))}</kernel>"
        f"<initrd>{escape(str(AGENT_GUEST_DIR / 'initrd.gz'))}</initrd>"
        f"<cmdline>console=ttyS0 panic=-1</cmdline></os>"
        f"<on_crash>destroy</on_crash><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file={_attr(guest.disk)}/>"
        f"<target dev='vda' bus='virtio'/></disk>"
        f"<serial type='file'><source path={_attr(guest.serial_path)}/><target port='0'/></serial>"
        f"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        f"<controller type='usb' model='none'/><memballoon model='none'/>"
        f"</devices></domain>")


@pytest.fixture
def agent_guest_factory(libvirt_uri, tmp_path):
    built = all((AGENT_GUEST_DIR / f).is_file() for f in ("vmlinuz", "initrd.gz"))
    need(built, f"no agent guest kernel and initramfs in {AGENT_GUEST_DIR} (run: scripts/testhost.sh install)")
    factory = AgentGuestFactory(libvirt_uri, tmp_path / "agent-guests")
    try:
        yield factory
    finally:
        factory.close()
