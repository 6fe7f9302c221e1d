"""libvirt events: the default event loop, one event connection per host, and the
translation of libvirt's event codes into the product's event names.

Rules that libvirt imposes (see /work/shared/PITFALLS.md, "libvirt events"):

- ``start_loop()`` registers libvirt's default event implementation and must run before
  any connection is opened in the process, or keepalive does not work on connections
  opened earlier. ``virtwarden listen`` calls it first thing; ``LibvirtHost.open`` calls
  it before every connection it opens (the first call starts the loop). It never runs
  in a process forked from one where it ran.
- Callbacks run on the loop thread. They copy plain values (host, domain name, UUID,
  event kind, detail, time) into a ``queue.Queue`` and return: no database, no broker,
  no libvirt RPC (``virDomain.name()`` and ``UUIDString()`` are local), no logging.
  A blocking callback would stall every other event and the keepalive.
- Callback ids belong to one connection: after a reconnect everything is registered
  again (``EventConnection.open`` does it all).

Lifecycle mapping (libvirt event / detail -> product event):

=============  ===========================================  ============================
libvirt        detail                                       product event
=============  ===========================================  ============================
DEFINED        ADDED, RENAMED                               domain.defined
DEFINED        UPDATED, FROM_SNAPSHOT                       domain.updated (no trigger)
UNDEFINED      REMOVED, RENAMED                             domain.undefined
STARTED        BOOTED, RESTORED, FROM_SNAPSHOT              domain.started
STARTED        WAKEUP                                       domain.resumed
STARTED        MIGRATED (incoming, not finished)            domain.incoming (no trigger)
SUSPENDED      any (paused, I/O error, migration, ...)      domain.suspended
PMSUSPENDED    MEMORY, DISK                                 domain.suspended
RESUMED        MIGRATED (incoming migration finished)       domain.migrated
RESUMED        UNPAUSED, FROM_SNAPSHOT, POSTCOPY...         domain.resumed
STOPPED        SHUTDOWN, DESTROYED, SAVED, FROM_SNAPSHOT    domain.stopped
STOPPED        CRASHED, FAILED                              domain.crashed
STOPPED        MIGRATED (left this host)                    domain.departed (no trigger)
SHUTDOWN       any (guest is shutting down; STOPPED follows) domain.shutdown (no trigger)
CRASHED        PANICKED, CRASHLOADED                        domain.crashed
=============  ===========================================  ============================

``domain.migrated`` is reported by the destination once the guest runs there; libvirt's
SUSPENDED/MIGRATED on the source also fires when a migration fails, so it is only a
suspend. A reboot inside the guest keeps the QEMU process and shows as
``domain.rebooted`` (no trigger); a restart of the process (``virsh reboot`` with
``on_reboot=destroy``, or destroy then start) shows as domain.stopped then
domain.started. Block jobs are ``block-job`` (detail ``vda commit ready``), finished
domain jobs ``job.completed`` (detail ``backup ok``), guest agents
``agent.connected``/``agent.disconnected``.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
from virtwarden.hypervisor import liveness

from virtwarden.errors import HypervisorUnavailable
from virtwarden.redact import mask

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_loop_lock = threading.Lock()
_loop_started = False
# Set in a child forked after the loop started: the registration came along, the thread
# running it did not, and a second registration or a new thread on the inherited state
# is not safe (the loop's lock may have been held at the fork).
_loop_inherited = False


def _forked() -> None:
    global _loop_inherited
    _loop_inherited = _loop_inherited or _loop_started


os.register_at_fork(after_in_child=_forked)


@dataclass(frozen=True)
class HostEvent:
    """One event as a callback saw it; ``at`` is the wall-clock time it arrived."""

    host: str
    domain: str
    uuid: str
    kind: str
    detail: str
    at: float


def start_loop() -> bool:
    """Register libvirt's default event implementation and run it in a daemon thread.

    Call before opening any libvirt connection in this process; later calls do nothing.
    False when the loop cannot run here: this process was forked from one where it ran
    (a Celery pool child of a parent that had started it). Without the loop, keepalive
    probes are never sent.
    """
    global _loop_started
    with _loop_lock:
        if _loop_inherited:
            return False
        if not _loop_started:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_loop, name="libvirt-events", daemon=True).start()
            _loop_started = True
        return True


def _run_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            time.sleep(0.1)  # a failed iteration must not end the loop (keepalives live here)


# --- lifecycle mapping (pure) -----------------------------------------------------------
_E = libvirt
_LIFECYCLE: dict[int, tuple[str, dict[int, str]]] = {
    # event: (default product kind, {detail: product kind where it differs})
    _E.VIR_DOMAIN_EVENT_DEFINED: ("domain.updated", {_E.VIR_DOMAIN_EVENT_DEFINED_ADDED: "domain.defined",
                                                     _E.VIR_DOMAIN_EVENT_DEFINED_RENAMED: "domain.defined"}),
    _E.VIR_DOMAIN_EVENT_UNDEFINED: ("domain.undefined", {}),
    _E.VIR_DOMAIN_EVENT_STARTED: ("domain.started", {_E.VIR_DOMAIN_EVENT_STARTED_WAKEUP: "domain.resumed",
                                                     _E.VIR_DOMAIN_EVENT_STARTED_MIGRATED: "domain.incoming"}),
    _E.VIR_DOMAIN_EVENT_SUSPENDED: ("domain.suspended", {}),
    _E.VIR_DOMAIN_EVENT_PMSUSPENDED: ("domain.suspended", {}),
    _E.VIR_DOMAIN_EVENT_RESUMED: ("domain.resumed", {_E.VIR_DOMAIN_EVENT_RESUMED_MIGRATED: "domain.migrated"}),
    _E.VIR_DOMAIN_EVENT_STOPPED: ("domain.stopped", {_E.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "domain.crashed",
                                                     _E.VIR_DOMAIN_EVENT_STOPPED_FAILED: "domain.crashed",
                                                     _E.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "domain.departed"}),
    _E.VIR_DOMAIN_EVENT_SHUTDOWN: ("domain.shutdown", {}),
    _E.VIR_DOMAIN_EVENT_CRASHED: ("domain.crashed", {}),
}
_DETAILS: dict[int, dict[int, str]] = {
    _E.VIR_DOMAIN_EVENT_DEFINED: {0: "added", 1: "updated", 2: "renamed", 3: "from snapshot"},
    _E.VIR_DOMAIN_EVENT_UNDEFINED: {0: "removed", 1: "renamed"},
    _E.VIR_DOMAIN_EVENT_STARTED: {0: "booted", 1: "migrated", 2: "restored", 3: "from snapshot", 4: "wakeup"},
    _E.VIR_DOMAIN_EVENT_SUSPENDED: {0: "paused", 1: "migrated", 2: "I/O error", 3: "watchdog", 4: "restored",
                                    5: "from snapshot", 6: "API error", 7: "postcopy", 8: "postcopy failed"},
    _E.VIR_DOMAIN_EVENT_RESUMED: {0: "unpaused", 1: "migrated", 2: "from snapshot", 3: "postcopy",
                                  4: "postcopy failed"},
    _E.VIR_DOMAIN_EVENT_STOPPED: {0: "shutdown", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                                  5: "failed", 6: "from snapshot"},
    _E.VIR_DOMAIN_EVENT_SHUTDOWN: {0: "finished", 1: "guest", 2: "host"},
    _E.VIR_DOMAIN_EVENT_PMSUSPENDED: {0: "memory", 1: "disk"},
    _E.VIR_DOMAIN_EVENT_CRASHED: {0: "panicked", 1: "crashloaded"},
}
_BLOCK_JOB_TYPES = {_E.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull", _E.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
                    _E.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
                    _E.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
                    getattr(_E, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup"}
_BLOCK_JOB_STATUS = {_E.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed", _E.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
                     _E.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled", _E.VIR_DOMAIN_BLOCK_JOB_READY: "ready"}
_JOB_OPERATIONS = {_E.VIR_DOMAIN_JOB_OPERATION_BACKUP: "backup", _E.VIR_DOMAIN_JOB_OPERATION_DUMP: "dump",
                   _E.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: "migration-in",
                   _E.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "migration-out",
                   _E.VIR_DOMAIN_JOB_OPERATION_SAVE: "save", _E.VIR_DOMAIN_JOB_OPERATION_RESTORE: "restore",
                   _E.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "snapshot",
                   _E.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_REVERT: "snapshot-revert"}


def lifecycle_kind(event: int, detail: int) -> tuple[str, str]:
    """The product event name and a readable detail for a libvirt lifecycle event."""
    default, by_detail = _LIFECYCLE.get(event, ("domain.unknown", {}))
    words = _DETAILS.get(event, {}).get(detail, f"detail {detail}")
    return by_detail.get(detail, default), words


def block_job_detail(disk: str, job_type: int, status: int) -> str:
    return (f"{disk} {_BLOCK_JOB_TYPES.get(job_type, f'type {job_type}')} "
            f"{_BLOCK_JOB_STATUS.get(status, f'status {status}')}")


def job_completed_detail(params: dict[str, Any]) -> str:
    op = params.get("operation")
    name = _JOB_OPERATIONS.get(op, f"operation {op}") if op is not None else "job"
    ok = params.get("success", True)
    return f"{name} {'ok' if ok else 'failed'}"


def connect_within(host: str, uri: str, seconds: float, *, read_only: bool = False) -> libvirt.virConnect:
    """``_open_within``, its failures as HypervisorUnavailable naming ``host``."""
    try:
        return _open_within(uri, seconds, read_only=read_only)
    except TimeoutError:
        raise HypervisorUnavailable(f"host {host}: libvirt at {mask(uri)} did not answer within {seconds:g} s "
                                    "(libvirtd stopped, hung or unreachable?)") from None
    except libvirt.libvirtError as e:
        raise HypervisorUnavailable(f"host {host}: cannot connect to libvirt at {mask(uri)}:"
                                    f" {e.get_error_message()}") from e


def _open_within(uri: str, seconds: float, *, read_only: bool = False) -> libvirt.virConnect:
    """``libvirt.open(uri)`` (``openReadOnly`` with ``read_only``), given up after
    ``seconds`` (TimeoutError): libvirt itself waits for ever on a libvirtd whose socket
    accepts but that does not answer. The attempt runs on in a daemon thread, which
    closes the connection if it opens after all."""
    got: list[libvirt.virConnect] = []
    failed: list[libvirt.libvirtError] = []
    guard = threading.Lock()
    abandoned = threading.Event()
    done = threading.Event()

    def attempt() -> None:
        try:
            conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
        except libvirt.libvirtError as e:
            failed.append(e)
        else:
            with guard:
                late = abandoned.is_set()
                if not late:
                    got.append(conn)
            if late:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
        finally:
            done.set()

    threading.Thread(target=attempt, name="libvirt-open", daemon=True).start()
    finished = done.wait(seconds)
    with guard:
        if not finished and not got and not failed:
            abandoned.set()
            raise TimeoutError(uri)
    if failed:
        raise failed[0]
    return got[0]


# --- one host's event connection -----------------------------------------------------------
class EventConnection:
    """A read-only connection that feeds ``sink`` with this host's domain events.

    ``lost`` is set when libvirt closes the connection (EOF, keepalive timeout, error):
    the owner then calls ``close()`` and opens a new one.
    """

    def __init__(self, host: str, uri: str, sink: queue.Queue[Any]) -> None:
        self.host, self.uri, self.sink = host, uri, sink
        self.lost = threading.Event()
        self.close_reason = ""
        self._conn: libvirt.virConnect | None = None
        self._ids: list[int] = []

    def open(self) -> None:
        """Connect, turn keepalive on, watch for closing and subscribe to the events.
        Opening and keepalive follow the process's ``hypervisor.Liveness`` (the
        configuration's ``libvirt`` section), as every other connection does.

        HypervisorUnavailable when the host does not answer, or not within the open timeout."""
        self.lost.clear()
        self.close_reason = ""
        wanted = liveness()
        conn = self._conn = connect_within(self.host, self.uri, wanted.open_timeout, read_only=True)
        try:
            conn.setKeepAlive(wanted.keepalive_interval, wanted.keepalive_count)
            conn.registerCloseCallback(self._on_close, None)
            subscriptions: list[tuple[int, Callable[..., None]]] = [
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot),
                (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job),
                (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed),
                (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent),
            ]
            self._ids = [conn.domainEventRegisterAny(None, event_id, cb, None) for event_id, cb in subscriptions]
        except libvirt.libvirtError as e:
            self.close()
            raise HypervisorUnavailable(f"host {self.host}: cannot subscribe to events at {mask(self.uri)}:"
                                        f" {e.get_error_message()}") from e

    def alive(self) -> bool:
        """False once the connection is closed or keepalive gave up (a local check)."""
        try:
            return self._conn is not None and not self.lost.is_set() and bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        """Forget the connection; every call may fail on a dead one, none matters."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb_id in self._ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb_id)
        self._ids = []
        for step in (conn.unregisterCloseCallback, conn.close):
            with contextlib.suppress(libvirt.libvirtError):
                step()

    # Callbacks: the event loop thread runs these. Copy values, put, return.
    def _put(self, dom: libvirt.virDomain, kind: str, detail: str) -> None:
        self.sink.put_nowait(HostEvent(self.host, dom.name(), dom.UUIDString(), kind, detail, time.time()))

    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any) -> None:
        kind, words = lifecycle_kind(event, detail)
        self._put(dom, kind, words)

    def _on_reboot(self, _conn: Any, dom: libvirt.virDomain, _opaque: Any) -> None:
        self._put(dom, "domain.rebooted", "guest reset")

    def _on_block_job(self, _conn: Any, dom: libvirt.virDomain, disk: str, job_type: int, status: int,
                      _opaque: Any) -> None:
        self._put(dom, "block-job", block_job_detail(disk, job_type, status))

    def _on_job_completed(self, _conn: Any, dom: libvirt.virDomain, params: dict[str, Any], _opaque: Any) -> None:
        self._put(dom, "job.completed", job_completed_detail(params))

    def _on_agent(self, _conn: Any, dom: libvirt.virDomain, state: int, _reason: int, _opaque: Any) -> None:
        connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
        self._put(dom, "agent.connected" if connected else "agent.disconnected", "qemu-guest-agent")

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self.close_reason = _CLOSE_REASONS.get(reason, f"reason {reason}")
        self.lost.set()


_CLOSE_REASONS = {libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
                  libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file (libvirtd stopped?)",
                  libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
                  libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us"}
