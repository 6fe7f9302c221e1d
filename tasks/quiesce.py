"""Quiesce: the guest's filesystems frozen through qemu-guest-agent for the instant a
backup or snapshot is taken, so the point holds what a clean unmount would have
written (dirty page cache flushed, journal committed), not just what had reached the
disk: ``quiesced`` instead of ``crash``-consistent.

    with quiesced(hv, "web01", "auto", log=log) as consistency:
        ...take the point in time (backupBegin, the external snapshot)...
    # consistency is "quiesced" or "crash": record it with the point

Modes (a policy's ``backup.quiesce`` / ``snapshots.quiesce``):

- ``auto``: freeze when the agent is connected and answers a ping; otherwise, or when
  the freeze fails, the point is crash-consistent and the log says why;
- ``always``: as auto, but a point that cannot be quiesced is not taken: QuiesceFailed
  (``check`` says so before anything is created);
- ``never``: no agent call, crash-consistent.

The guest is never left frozen by us. The thaw runs in a ``finally``, whatever the
block did. A freeze that was not answered in time may still run later (the agent got it
and was stuck, or is slow to flush): then, and when a thaw itself went unanswered, the
agent's freeze status is read, and the thaw sent again, until it says ``thawed``, for
up to ``agent.thaw_grace_seconds`` (virtwarden.config.AgentConfig, as is the timeout of
each call). The agent handles requests in order, so an answer always
comes after that late freeze. Only an agent that stays silent longer than that is beyond
reach; the log then says what to run by hand. A freeze the agent refused (an error
answer) froze nothing (qemu-ga undoes a partial freeze itself), so nothing is thawed
then: a freeze someone else holds is left to them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from virtwarden.hypervisor.types import Hypervisor

from virtwarden.config import AgentConfig
from virtwarden.errors import (
    AgentUnresponsive,
    ConfigError,
    DomainNotFound,
    HypervisorError,
    QuiesceFailed,
    VirtwardenError,
)

MODES = ("auto", "always", "never")
DEFAULTS = AgentConfig()  # the configuration's ``agent`` section when none is given

QUIESCED, CRASH = "quiesced", "crash"
_log = logging.getLogger(__name__)


class Log(Protocol):
    """A logging.Logger or LoggerAdapter (``job_log`` gives one that names the job)."""

    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...


class _JobLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['prefix']}{msg}", kwargs


def job_log(domain: str, job_id: str) -> logging.LoggerAdapter:
    """This module's logger, every line starting ``domain D job J: ``."""
    return _JobLog(_log, {"prefix": f"domain {domain} job {job_id}: "})


def check(hv: Hypervisor, domain: str, mode: str, settings: AgentConfig = DEFAULTS) -> None:
    """Refuse early (QuiesceFailed) when ``always`` cannot be honoured because the agent
    is not there, so that a job fails before it creates or changes anything."""
    _check_mode(mode)
    if mode == "always":
        why = _unavailable(hv, domain, settings.call_timeout_seconds)
        if why:
            raise QuiesceFailed(_always_message(domain, why))


@contextmanager
def quiesced(hv: Hypervisor, domain: str, mode: str, settings: AgentConfig = DEFAULTS,
             log: Log = _log) -> Iterator[str]:
    """Freeze ``domain``'s filesystems for the block (see the module docstring) and yield
    the consistency of what is taken inside it: ``"quiesced"`` or ``"crash"``."""
    _check_mode(mode)
    if mode == "never":
        yield CRASH
        return
    timeout = settings.call_timeout_seconds
    why = _unavailable(hv, domain, timeout)
    sent = unsure = False
    if why is None:
        why, sent, unsure = _freeze(hv, domain, timeout, log)
    if why and mode == "always":
        if sent:
            _thaw(hv, domain, settings, log, unsure=unsure)
        raise QuiesceFailed(_always_message(domain, why))
    if why:
        log.warning("not quiesced (%s): the point is crash-consistent", why)
    try:
        yield CRASH if why else QUIESCED
    finally:
        if sent:
            _thaw(hv, domain, settings, log, unsure=unsure)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"quiesce must be one of {', '.join(MODES)}, not {mode!r}")


def _unavailable(hv: Hypervisor, domain: str, timeout: float) -> str | None:
    """Why the agent cannot be asked to freeze, or None when it answers."""
    from virtwarden.hypervisor import agent

    if not agent.connected(hv, domain):
        return ("the guest agent is not connected (no org.qemu.guest_agent.0 channel, "
                "or qemu-guest-agent is not running in the guest)")
    if not agent.ping(hv, domain, timeout):
        return f"the guest agent did not answer a ping within {timeout:g}s"
    return None


def _freeze(hv: Hypervisor, domain: str, timeout: float, log: Log) -> tuple[str | None, bool, bool]:
    """Freeze. Returns why it failed (None: it did not), whether a thaw is owed, and
    whether the agent's answer is unknown (the freeze may still happen later)."""
    from virtwarden.hypervisor import agent

    started = time.monotonic()
    try:
        count = agent.freeze(hv, domain, timeout)
    except AgentUnresponsive as e:
        return f"the freeze was not answered in time: {e}", True, True
    except HypervisorError as e:  # answered: nothing of ours is frozen (or someone else's freeze is)
        return f"the freeze failed: {e}", False, False
    if count < 1:  # the agent is in its frozen state all the same, until thawed
        return "the guest agent found no filesystem to freeze", True, False
    log.info("froze %d filesystem(s) in %.2fs", count, time.monotonic() - started)
    return None, True, False


def _thaw(hv: Hypervisor, domain: str, settings: AgentConfig, log: Log, *, unsure: bool) -> None:
    """Thaw. An answered thaw is final unless an earlier call went unanswered; then read
    the agent's status (and thaw again) until it says thawed, for up to the thaw grace."""
    from virtwarden.hypervisor import agent

    timeout, grace = settings.call_timeout_seconds, settings.thaw_grace_seconds

    try:
        count = agent.thaw(hv, domain, timeout)
        if not unsure:
            log.info("thawed %d filesystem(s)", count)
            return
    except HypervisorError as e:
        log.warning("thaw not answered, retrying for up to %gs: %s", grace, e)
    deadline = time.monotonic() + grace
    while True:
        pause = settings.thaw_retry_seconds
        try:
            state = agent.freeze_status(hv, domain, timeout)
            if state == "thawed":
                log.info("the guest agent reports its filesystems thawed")
                return
            last = f"the agent reports {state!r}"
            log.warning("the guest's filesystems are %s (a freeze that had timed out ran late): thawing", state)
            agent.thaw(hv, domain, timeout)
            pause = 0.0  # answered: read the status again at once
        except HypervisorError as e:
            last = str(e)
            if not _running(hv, domain):
                log.info("the domain stopped: no filesystem of it is frozen any more")
                return
        if time.monotonic() >= deadline:
            log.error("could not confirm that the guest's filesystems are thawed within %gs (%s): if the agent "
                      "runs the freeze it was sent, they stay frozen; check with `virsh qemu-agent-command %s "
                      "'{\"execute\":\"guest-fsfreeze-status\"}'` and thaw with `virsh domfsthaw %s`",
                      grace, last, domain, domain)
            return
        time.sleep(pause)


def _running(hv: Hypervisor, domain: str) -> bool:
    try:
        return hv.domain(domain).active
    except DomainNotFound:
        return False
    except VirtwardenError:
        return True  # cannot tell: keep trying


def _always_message(domain: str, why: str) -> str:
    return (f"domain {domain!r}: quiesce is 'always' but the filesystems cannot be frozen: {why}. "
            "Install and start qemu-guest-agent in the guest (with an org.qemu.guest_agent.0 virtio channel), "
            "or set quiesce: auto to accept crash-consistent points")
