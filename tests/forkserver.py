"""Start ``virtwarden`` commands for tests by forking a process that has imported them already.

A new interpreter spends about a second of a core importing what a worker, the API or the
listener needs before it does anything (Celery, SQLAlchemy and Alembic, libvirt, boto3,
FastAPI...). The suite starts a few hundred of them on two cores, so that second was a
good part of its time. This module runs one server process per test process: it imports
all of that once, then forks a child per command, which calls
``virtwarden.cli.main.main(ARGS)`` in a new session (its own process group, as
``start_new_session`` gives), with the given environment, working directory and output
file. From there the child is the command, as ``python -m virtwarden.cli ARGS`` would be:
its own pid, its own Celery pool children, signals, exit code.

What the fork skips is only the interpreter's start and the imports: tests/test_install.py
and tests/test_deploy.py still start the installed ``virtwarden`` command itself. A command
whose environment preloads a library (libfaketime's ``LD_PRELOAD``) execs a new
interpreter from the fork instead: a preloaded library takes effect only at exec.

``spawn()`` returns a ``Forked`` with the part of ``subprocess.Popen`` the harness uses
(``pid``, ``poll()``, ``wait(timeout)``, ``returncode``). The server forks only while it
has one thread, and its children die with it (PR_SET_PDEATHSIG), as it dies with the test
process.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What the commands a test starts import; each is tried (an optional one may be absent).
PRELOAD = (
    "libvirt", "boto3", "botocore.session", "sqlalchemy", "alembic.command", "alembic.config",
    "celery.bin.celery", "celery.apps.worker", "celery.worker.worker", "celery.worker.consumer",
    "celery.concurrency.prefork", "kombu.transport.redis", "redis",
    "virtwarden.cli.main", "virtwarden.cli.commands", "virtwarden.worker.celery_app",
    "virtwarden.worker.runner", "virtwarden.catalog.store", "virtwarden.api.app",
    "virtwarden.daemons.listener", "virtwarden.daemons.scheduler",
    "virtwarden.tasks.backup", "virtwarden.tasks.blockcommit", "virtwarden.tasks.restore",
    "virtwarden.tasks.restore_domain", "virtwarden.tasks.drill", "virtwarden.tasks.prune",
    "virtwarden.tasks.verify", "virtwarden.tasks.snapshots", "virtwarden.tasks.evacuate",
    "virtwarden.storage_backends.s3", "virtwarden.storage_backends.nfs",
    "virtwarden.storage_backends.format2.access",
)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Forked:
    """A command started by the fork server: what the harness uses of ``Popen``."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.request({"op": "poll", "pid": self.pid})["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"virtwarden (pid {self.pid})", timeout or 0)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", str(theirs.fileno())],
                                      cwd=REPO, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent)
        theirs.close()
        self._sock = ours
        self._file = ours.makefile("rwb")
        self._lock = threading.Lock()

    def request(self, req: dict) -> dict:
        with self._lock:
            self._file.write(json.dumps(req).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        if not line:
            raise RuntimeError(f"the fork server exited ({self._proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the fork server: {reply['error']}")
        return reply

    def spawn(self, args: list[str], *, env: dict[str, str], out: Path, err: Path | None = None,
              cwd: Path = REPO) -> Forked:
        """``virtwarden ARGS`` in a new session, its stdout appended to ``out``, its stderr to
        ``err`` (by default ``out`` too)."""
        for path in {out, err or out}:  # there when spawn returns, as Popen's stdout file would be
            path.touch()
        pid = self.request({"op": "spawn", "args": args, "env": env, "out": str(out), "err": str(err or out),
                            "cwd": str(cwd)})["pid"]
        return Forked(self, pid)

    def close(self) -> None:
        # The file holds a reference to the socket: closing the socket alone would leave it
        # open, the server would never see the end of its input and close() would wait.
        self._file.close()
        self._sock.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


_server: ForkServer | None = None


def spawn(args: list[str], *, env: dict[str, str], out: Path, err: Path | None = None,
          cwd: Path = REPO) -> Forked:
    """``virtwarden ARGS`` forked from this test process's server (started on first use)."""
    global _server
    if _server is None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server.spawn(args, env=env, out=out, err=err, cwd=cwd)


def run(args: list[str], *, env: dict[str, str], out: Path, err: Path,
        timeout: float) -> tuple[int, str, str]:
    """``virtwarden ARGS`` to its end: (exit code, stdout, stderr). A command still running
    after ``timeout`` is killed and TimeoutExpired raised, as ``subprocess.run`` does."""
    proc = spawn(args, env=env, out=out, err=err)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise
    texts = (out.read_text(errors="replace") if out.exists() else "",
             err.read_text(errors="replace") if err.exists() else "")
    for p in (out, err):
        p.unlink(missing_ok=True)
    return code, *texts


# --- the server -------------------------------------------------------------------------------


def _child(req: dict, channel: list) -> None:
    """In the forked child: become the command, never return."""
    code: object = 1
    try:
        for c in channel:  # the server's socket and its file: the command has no use for them
            c.close()
        os.setsid()
        _die_with_parent()
        args = list(req["args"])
        outputs = (req["out"], req["err"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in zip((1, 2), outputs, strict=False):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(req["cwd"])
        if "LD_PRELOAD" in req["env"]:  # a library preloaded (libfaketime) works only from exec on
            os.execve(sys.executable, [sys.executable, "-m", "virtwarden.cli", *args], req["env"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["virtwarden", *args]
        from virtwarden.cli.main import main

        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported in the command's output, as an interpreter would
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to tell
                stream.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve(fd: int) -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from virtwarden.cli.main import build_parser

    build_parser()  # built once here, not in every command
    gc.freeze()  # what every child inherits is never collected again, in it or here
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rwb")
    codes: dict[int, int] = {}
    for line in stream:
        req = json.loads(line)
        try:
            if req["op"] == "spawn":
                if threading.active_count() != 1:
                    raise RuntimeError(f"{threading.active_count()} threads: forking now is not safe")
                pid = os.fork()
                if pid == 0:
                    _child(req, [stream, sock])
                reply: dict = {"pid": pid}
            else:
                pid = req["pid"]
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                reply = {"code": codes.get(pid)}
        except Exception as e:  # noqa: BLE001 - the test process raises it
            reply = {"error": f"{type(e).__name__}: {e}"}
        stream.write(json.dumps(reply).encode() + b"\n")
        stream.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
