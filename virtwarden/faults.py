"""Test-only fault points: a process stops itself at a named place in a job.

Some faults must hit one exact instant (right after a manifest is published, right
after a disk's rename) that no outside signal can time. With ``VIRTWARDEN_FAULT_PAUSE``
set to a point's name, the process that reaches that point writes its pid to
``VIRTWARDEN_FAULT_DIR/<name>.pid`` and sends itself SIGSTOP: a real stop of the whole
process (every thread, the lease renewal included) that the test later ends with
SIGCONT or SIGKILL. ``VIRTWARDEN_FAULT_KILL`` does the same with SIGKILL. Each point
fires once per fault directory (the first process to create its pid file), so the
worker that takes the job over runs through it. Without those variables (always,
outside the test suite) a fault point does nothing.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_background = threading.RLock()  # a fault point inside the write itself takes it again


@contextmanager
def background_write() -> Iterator[None]:
    """Held around a catalog write that a background thread makes while a job runs (the
    lease's heartbeat). A fault point stops the process only outside such a write, so the
    fault is the instant of the job it names: a process stopped inside a SQLite write
    transaction would hold every other process's writes for as long as it is stopped,
    which is another fault (docs/architecture.md, Left out)."""
    with _background:
        yield


def pause_point(name: str) -> None:
    """Stop (or kill) this process here when the environment names this point."""
    for variable, sig in (("VIRTWARDEN_FAULT_PAUSE", signal.SIGSTOP), ("VIRTWARDEN_FAULT_KILL", signal.SIGKILL)):
        if name in os.environ.get(variable, "").split(",") and _first(name):
            with _background:  # no heartbeat is halfway through its write when the process stops
                os.kill(os.getpid(), sig)


def _first(name: str) -> bool:
    """Write this process's pid to the point's file unless some process did already."""
    where = Path(os.environ.get("VIRTWARDEN_FAULT_DIR", "/tmp"))
    where.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(where / f"{name}.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True
