"""Real faults for the tests: a private Redis that is stopped and started, a TCP proxy in
front of PostgreSQL that loses a commit's answer, a clock that runs ahead or behind
(libfaketime), and a process stopped at a named point (virtwarden/faults.py).

Nothing here imitates the thing under test: the broker really goes away, the database
really commits and the connection really drops, the worker process really stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import need

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_of(lease_owner: str) -> int:
    """The pid in a job's ``lease_owner`` (``host:pid:thread``)."""
    return int(lease_owner.split(":")[1])


def parent_of(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T) by a signal."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def faketime_env(offset: str) -> dict[str, str]:
    """Environment for a process whose clock runs ``offset`` (e.g. "+90s", "-5m") off."""
    need(LIBFAKETIME.exists(), f"{LIBFAKETIME} missing (apt package faketime; scripts/testhost.sh installs it)")
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"}


def pause_env(point: str, where: Path) -> dict[str, str]:
    """Environment that makes the first process to reach ``point`` stop itself there."""
    return {"VIRTWARDEN_FAULT_PAUSE": point, "VIRTWARDEN_FAULT_DIR": str(where)}


def kill_env(point: str, where: Path) -> dict[str, str]:
    """Environment that makes the first process to reach ``point`` SIGKILL itself there."""
    return {"VIRTWARDEN_FAULT_KILL": point, "VIRTWARDEN_FAULT_DIR": str(where)}


class PrivateRedis:
    """A Redis of the test's own, without persistence (like the one these machines run):
    stopping it loses every message it held, as a restarted broker without a disk does."""

    def __init__(self, workdir: Path) -> None:
        need(shutil.which("redis-server") is not None, "redis-server is not installed")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--maxmemory-policy", "noeviction"],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the server's log
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the private Redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


class CommitAnswerLost:
    """A TCP proxy in front of PostgreSQL that, once, forwards the COMMIT of the
    transaction that marks a restore point complete, lets the server commit it, and
    then closes the client's connection instead of passing the answer on: the write is
    durable, the client sees "server closed the connection". Connections opened later
    pass through untouched.

    It reads the PostgreSQL protocol (simple queries, as psycopg2 sends them), so the
    client must not use TLS (``sslmode=disable``)."""

    TRIGGER = ("UPDATE restore_points", "'complete'")

    def __init__(self, upstream_port: int = 5432) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.fired = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommitAnswerLost:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, direct_url: str) -> str:
        """``direct_url`` (a PostgreSQL URL on the upstream port) through this proxy."""
        sep = "&" if "?" in direct_url else "?"
        return direct_url.replace(f":{self.upstream_port}/", f":{self.port}/") + f"{sep}sslmode=disable"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        state = {"armed": False, "dropping": False}
        up = asyncio.ensure_future(self._client_to_server(client_r, server_w, state))
        down = asyncio.ensure_future(self._server_to_client(server_r, client_w, state))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for w in (client_w, server_w):
            w.close()

    async def _client_to_server(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, state: dict) -> None:
        while True:  # untyped start-up packets: SSL/GSS requests (answered "N"), then the start-up message
            head = await r.readexactly(4)
            body = await r.readexactly(struct.unpack("!I", head)[0] - 4)
            w.write(head + body)
            await w.drain()
            if struct.unpack("!I", body[:4])[0] not in (80877103, 80877104):
                break
        while True:
            kind = await r.readexactly(1)
            head = await r.readexactly(4)
            body = await r.readexactly(struct.unpack("!I", head)[0] - 4)
            if kind == b"Q" and not self.fired.is_set():
                text = body.rstrip(b"\0").decode(errors="replace")
                if all(t in text for t in self.TRIGGER):
                    state["armed"] = True
                elif state["armed"] and text.strip().upper() == "COMMIT":
                    state["dropping"] = True
                    self.fired.set()
            w.write(kind + head + body)
            await w.drain()

    async def _server_to_client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, state: dict) -> None:
        while True:
            first = await r.readexactly(1)
            if first in (b"N", b"S") and not state.get("started"):  # an answer to an SSL/GSS request
                w.write(first)
                await w.drain()
                continue
            state["started"] = True
            head = await r.readexactly(4)
            body = await r.readexactly(struct.unpack("!I", head)[0] - 4)
            if state["dropping"]:
                if first == b"Z":  # the COMMIT was carried out: the answer is lost with the connection
                    return
                continue
            w.write(first + head + body)
            await w.drain()


class CuttableProxy:
    """A TCP proxy in front of a local port (PostgreSQL, say) that can be cut: ``cut()``
    closes every connection it carries and, until ``restore()``, closes each new one as
    soon as it is accepted. The client sees what it sees when the server goes away:
    "server closed the connection unexpectedly". ``cut_after(marker, n)`` cuts by itself
    once the clients have sent ``marker`` n times (a Redis command, say): the server
    goes away in the middle of a conversation."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._cut = False
        self._marker: bytes | None = None
        self._left = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CuttableProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, direct_url: str) -> str:
        """``direct_url`` (a URL on the upstream port) through this proxy."""
        return direct_url.replace(f":{self.upstream_port}/", f":{self.port}/")

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._cut_now)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_cut", False)

    def cut_after(self, marker: bytes, times: int) -> None:
        def arm() -> None:
            self._marker, self._left = marker, times

        self._loop.call_soon_threadsafe(arm)

    def _cut_now(self) -> None:
        self._cut, self._marker = True, None
        for w in list(self._writers):
            w.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, outbound: bool) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
                if outbound and self._marker is not None:
                    self._left -= data.count(self._marker)
                    if self._left <= 0:
                        self._cut_now()

        tasks = [asyncio.ensure_future(pipe(client_r, server_w, True)),
                 asyncio.ensure_future(pipe(server_r, client_w, False))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.close()


def wait_file(path: Path, timeout: float) -> str:
    """The content of ``path`` once it exists and is not empty."""
    from tests.harness import wait_for

    return wait_for(lambda: path.exists() and path.read_text(), timeout, str(path), poll=0.1)


def stopped_at(point: str, where: Path, timeout: float = 120) -> int:
    """The pid of the process that stopped itself at ``point`` (``pause_env(point, where)``),
    once it is stopped: an exact instant of a job (the middle of an upload, say), with no
    data large enough to make the instant last."""
    from tests.harness import wait_for

    pid = int(wait_file(where / f"{point}.pid", timeout))
    wait_for(lambda: stopped(pid), 10, f"process {pid} to stop itself at {point}")
    return pid


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
