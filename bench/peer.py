"""virtnbdbackup, the tool virtwarden is measured against: its full, incremental and
restore, run on the same guest and the same data in the same run (Debian's
``virtnbdbackup`` package; ``scripts/testhost.sh`` installs it).

virtnbdbackup reads the disks over NBD in pull mode and writes its own stream format
into a directory; ``virtnbdrestore`` turns a backup directory back into qcow2 images.
It refuses a guest that has checkpoints of another tool, so it backs up a twin guest:
the same disk size, random data of the same size at the same offsets, the same dirtied
pieces (same offsets, fresh random bytes). Each repeat starts a new backup directory
and removes its checkpoints at the end.
"""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

from bench.guest import BenchGuest, Dirtied

PEER = "virtnbdbackup"
CHECKPOINT_PREFIX = "virtnbdbackup."


def missing() -> str | None:
    """Why the peer cannot run here, or None."""
    gone = [tool for tool in ("virtnbdbackup", "virtnbdrestore") if shutil.which(tool) is None]
    return f"{', '.join(gone)} not installed (Debian: apt-get install virtnbdbackup)" if gone else None


def version() -> str:
    return subprocess.run(["virtnbdbackup", "--version"], capture_output=True, text=True).stdout.strip()


class Peer:
    def __init__(self, guest: BenchGuest, root: Path) -> None:
        assert guest.dom is not None, "create() the guest first"
        self.guest, self.dom, self.root = guest, guest.dom, root
        self.backup = root / "backup"

    def dirty(self, total: int, within: int, rng: random.Random) -> Dirtied:
        """The twin's copy of the main guest's dirtying (``rng`` in the state the main
        guest's call started from)."""
        return self.guest.dirty(total, within, rng)

    def _run(self, *args: str) -> None:
        done = subprocess.run(list(args), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def full(self) -> None:
        self.forget()
        self.root.mkdir(parents=True)
        self._run("virtnbdbackup", "-d", self.dom.name(), "-l", "full", "-o", str(self.backup), "-n",
                  "-S", str(self.root))

    def incremental(self) -> None:
        self._run("virtnbdbackup", "-d", self.dom.name(), "-l", "inc", "-o", str(self.backup), "-n",
                  "-S", str(self.root))

    def restore(self, out: Path) -> None:
        """Every disk as of the newest backup in the directory, as qcow2 images in ``out``."""
        self._run("virtnbdrestore", "-i", str(self.backup), "-o", str(out), "-n")

    def stored(self, pattern: str) -> int:
        """Bytes of the backup directory's data files matching ``pattern`` (``*.full.data``...)."""
        return sum(p.stat().st_size for p in self.backup.glob(pattern))

    def forget(self) -> None:
        """Remove its backup directory and its checkpoints (newest first, so libvirt merges
        nothing into a checkpoint that is about to go)."""
        shutil.rmtree(self.root, ignore_errors=True)
        ours = [c for c in self.dom.listAllCheckpoints() if c.getName().startswith(CHECKPOINT_PREFIX)]
        for checkpoint in sorted(ours, key=lambda c: c.getName(), reverse=True):
            checkpoint.delete()
