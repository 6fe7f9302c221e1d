"""``make demo``: the main job end to end on embedded defaults, narrated.

A throwaway guest whose disk holds known data is backed up in full and incrementally by
a real worker, the latest point is restored into a directory and compared with what
the disk held. Everything goes through the ``virtwarden`` command as an operator would
type it; guest writes go through ``virsh qemu-monitor-command`` (qemu-io inside the
guest's own QEMU, so the dirty bitmaps see them like guest I/O). The guest is removed
at the end; the catalog and repository stay in the data directory for a look around.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MiB = 1024 * 1024
DISK_MIB = 256
URI = "qemu:///system"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print("    $ " + " ".join(args), flush=True)
    p = subprocess.run(args, text=True, capture_output=True)
    for line in (p.stdout + p.stderr).strip().splitlines():
        print(f"      {line}")
    if check and p.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {p.returncode}: {' '.join(args)}")
    return p


def virtwarden(*args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "virtwarden.cli", *args)


class Guest:
    def __init__(self, root: Path) -> None:
        self.name = f"virtwarden-demo-{secrets.token_hex(3)}"
        self.root = root / self.name
        self.disk = self.root / "vda.qcow2"
        self.shadow = self.root / "vda.expected.raw"  # what the disk must hold, kept by us

    def create(self) -> None:
        self.root.mkdir(parents=True)
        with open(self.shadow, "wb") as f:
            f.truncate(DISK_MIB * MiB)
        run("qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), f"{DISK_MIB}M")
        kind = "kvm" if os.path.exists("/dev/kvm") and subprocess.run(
            ["virsh", "-c", URI, "domcapabilities", "--virttype", "kvm"], capture_output=True
        ).returncode == 0 else "qemu"
        xml = self.root / "domain.xml"
        xml.write_text(f"""<domain type='{kind}'>
  <name>{self.name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{self.disk}'/><target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>
""")
        run("virsh", "-c", URI, "define", str(xml))
        run("virsh", "-c", URI, "start", self.name)

    def write(self, offset: int, length: int) -> None:
        """Random bytes into the running guest's disk, and the same into our copy."""
        data = self.root / "chunk.bin"
        data.write_bytes(os.urandom(length))
        cmd = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -s {data} {offset} {length}"'
        p = run("virsh", "-c", URI, "qemu-monitor-command", self.name, "--hmp", cmd)
        if p.stdout.strip():
            raise SystemExit(f"demo: guest write failed: {p.stdout.strip()}")
        with open(self.shadow, "r+b") as f:
            f.seek(offset)
            f.write(data.read_bytes())
        data.unlink()
        time.sleep(0.2)  # qemu-io runs inside QEMU; let it land before the next step

    def remove(self) -> None:
        run("virsh", "-c", URI, "destroy", self.name, check=False)
        names = subprocess.run(["virsh", "-c", URI, "checkpoint-list", self.name, "--name"],
                               capture_output=True, text=True).stdout.split()
        for cp in names:
            run("virsh", "-c", URI, "checkpoint-delete", self.name, cp, "--metadata", check=False)
        run("virsh", "-c", URI, "undefine", self.name, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
    data_dir = Path(os.environ.get("VIRTWARDEN_DATA_DIR", "/var/lib/virtwarden"))
    os.environ["VIRTWARDEN_DATA_DIR"] = str(data_dir)
    os.environ.pop("VIRTWARDEN_CONFIG", None)
    say(f"virtwarden demo on embedded defaults: catalog and repository under {data_dir}")
    virtwarden("doctor")
    guest = Guest(data_dir / "demo-guests")
    worker = None
    try:
        say(f"creating a throwaway guest {guest.name} with a {DISK_MIB} MiB disk, and writing 64 MiB of known data")
        guest.create()
        guest.write(0, 32 * MiB)
        guest.write(128 * MiB, 32 * MiB)

        say("starting a worker (Celery, Redis broker) for this host")
        log = data_dir / "demo-worker.log"
        worker = subprocess.Popen([sys.executable, "-m", "virtwarden.cli", "--log-level", "info", "worker"],
                                  stdout=open(log, "wb"),  # noqa: SIM115 - the worker's log for the demo's length
                                  stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(worker, log)

        say("full backup (libvirt push-mode backup + a new checkpoint)")
        virtwarden("backup", guest.name, "--wait")
        say("the guest writes 8 MiB more; incremental backup copies only the dirty clusters")
        guest.write(64 * MiB, 8 * MiB)
        virtwarden("backup", guest.name, "--wait")
        virtwarden("backups", guest.name)

        out = data_dir / "demo-restore" / guest.name
        say(f"restoring the latest point into {out}")
        virtwarden("restore", guest.name, "--point", "latest", "--to-dir", str(out), "--wait")
        say("comparing the restored disk with what the guest's disk held")
        same = subprocess.run(["qemu-img", "compare", "-F", "raw", str(out / "vda.qcow2"), str(guest.shadow)],
                              capture_output=True, text=True)
        if same.returncode != 0:
            print(same.stdout + same.stderr)
            say("MISMATCH: the restored image differs")
            return 1
        say("MATCH: the restored vda.qcow2 is bit for bit what the guest's disk held")
        shutil.rmtree(out, ignore_errors=True)
        return 0
    finally:
        say("cleaning up the guest and stopping the worker")
        guest.remove()
        if worker and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
        print(f"    backups and catalog stay in {data_dir}; `virtwarden jobs` lists what ran", flush=True)


def _wait_ready(worker: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b" ready." in log.read_bytes():
            print(f"    worker ready (log: {log})")
            return
        if worker.poll() is not None:
            break
        time.sleep(0.3)
    raise SystemExit(f"demo: the worker did not start; see {log}:\n{log.read_text()[-2000:]}")


if __name__ == "__main__":
    sys.exit(main())
