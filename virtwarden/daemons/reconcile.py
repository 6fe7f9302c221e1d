"""Reconciliation: what happened on a host while the listener was not connected (pure).

libvirt does not replay events to a client that was away, so after every (re)connect
the listener lists the host's domains and compares them with the catalog's domains
table (which the events keep up to date). Each difference becomes the event that would
have been seen, marked ``reconciled``:

================================  ==========================================
catalog says                      libvirt says now -> events made up
================================  ==========================================
unknown or undefined              persistent: domain.defined; active: domain.started
                                  (then domain.suspended if paused)
shut off / crashed                active: domain.started (+ domain.suspended)
active                            shut off: domain.stopped; crashed: domain.crashed
running                           paused: domain.suspended
paused                            running: domain.resumed
active on another host            active here: domain.migrated
on this host                      not listed: domain.undefined
================================  ==========================================

A domain that stopped and started again during the outage is in the same state before
and after, so it yields nothing: the outage hides that restart.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from virtwarden.catalog.events import RECONCILED, UNDEFINED, KnownDomain

DEPARTED = "departed"  # migrated away from the host in the row
_OFF = {"shutoff", "crashed", DEPARTED}
_PAUSED = {"paused", "pmsuspended"}

# The state an event leaves a domain in (None: the event does not say).
EVENT_STATES = {"domain.undefined": UNDEFINED, "domain.started": "running", "domain.stopped": "shutoff",
                "domain.crashed": "crashed", "domain.suspended": "paused", "domain.resumed": "running",
                "domain.migrated": "running", "domain.departed": DEPARTED}


@dataclass(frozen=True)
class SeenDomain:
    """A domain as libvirt lists it now."""

    uuid: str
    name: str
    state: str
    persistent: bool


@dataclass(frozen=True)
class MissedEvent:
    uuid: str
    name: str
    kind: str
    detail: str
    state: str  # the state to record with it


def state_after(kind: str, detail: str, previous: str | None) -> str | None:
    """The domain's state after a live event, from the state before it."""
    if kind == "domain.defined":
        return "shutoff" if previous in (None, UNDEFINED) else None
    if kind == "domain.undefined" and _phase(previous) in ("on", "paused"):
        return None  # a running domain that is undefined runs on, as a transient one
    if kind == "domain.suspended" and detail in ("memory", "disk"):
        return "pmsuspended"
    return EVENT_STATES.get(kind)


def part_of_start(kind: str, previous: str | None) -> bool:
    """libvirt starts QEMU paused and says RESUMED just before STARTED: that resume is
    part of the start, not a resume that triggers should see."""
    return kind == "domain.resumed" and _phase(previous) in ("gone", "off")


def foreign(kind: str, event_host: str, before: KnownDomain | None) -> bool:
    """An event from a host other than the one the domain is active on: the destination
    of an incoming migration (which may fail there), or the source saying it left after
    the destination said it arrived. Recorded, but it neither moves the domain's row nor
    starts jobs; only ``domain.migrated`` (the arrival) moves a running domain."""
    return (before is not None and before.host not in (None, event_host)
            and _phase(before.state) in ("on", "paused") and kind != "domain.migrated")


def _phase(state: str | None) -> str:
    if state in (None, UNDEFINED):
        return "gone"
    if state in _OFF:
        return "off"
    return "paused" if state in _PAUSED else "on"


def missed_events(host: str, known: Mapping[str, KnownDomain], seen: Iterable[SeenDomain]) -> list[MissedEvent]:
    """The events that explain the difference between the catalog and libvirt."""
    out: list[MissedEvent] = []
    listed = set()
    for d in seen:
        listed.add(d.uuid)
        k = known.get(d.uuid)
        elsewhere = _elsewhere(host, k)
        if elsewhere and _phase(d.state) == "off":
            continue  # a leftover definition here of a domain that lives on another host
        kinds = _transition(k.state if k else None, d, moved=elsewhere)
        before = f"{k.state} on host {k.host}" if elsewhere and k else (k.state if k and k.state else "unknown")
        out += [MissedEvent(d.uuid, d.name, kind, f"{RECONCILED}: was {before}, now {d.state}", d.state)
                for kind in kinds]
    for k in known.values():
        if k.host == host and k.uuid not in listed and k.state not in (UNDEFINED, DEPARTED):
            out.append(MissedEvent(k.uuid, k.name, "domain.undefined",
                                   f"{RECONCILED}: was {k.state}, no longer on host {host}", UNDEFINED))
    return out


def _transition(before: str | None, now: SeenDomain, *, moved: bool) -> list[str]:
    old, new = _phase(before), _phase(now.state)
    if moved:
        return ["domain.migrated"] + (["domain.suspended"] if new == "paused" else [])
    if old == "gone":
        kinds = ["domain.defined"] if now.persistent else []
        if new != "off":
            kinds.append("domain.started")
        return kinds + (["domain.suspended"] if new == "paused" else [])
    if old == "off" and new != "off":
        return ["domain.started"] + (["domain.suspended"] if new == "paused" else [])
    if old != "off" and new == "off":
        return ["domain.crashed" if now.state == "crashed" else "domain.stopped"]
    if (old, new) == ("on", "paused"):
        return ["domain.suspended"]
    if (old, new) == ("paused", "on"):
        return ["domain.resumed"]
    return []


def still_here(host: str, known: Mapping[str, KnownDomain], seen: Iterable[SeenDomain]) -> list[KnownDomain]:
    """The catalog rows to refresh for what is listed (not the leftover definitions of
    domains that live elsewhere)."""
    return [KnownDomain(d.uuid, d.name, host, d.state) for d in seen
            if not (_elsewhere(host, known.get(d.uuid)) and _phase(d.state) == "off")]


def _elsewhere(host: str, k: KnownDomain | None) -> bool:
    """The catalog has the domain on another host, not gone."""
    return k is not None and k.host not in (None, host) and _phase(k.state) != "gone"
