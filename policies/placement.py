"""Where the running domains of a host go when it is evacuated: a pure function over
plain data (what libvirt said about each host, what policy allows each domain).

Rules, in order:

- Only running domains move (live migration); shut-off ones stay defined where they are.
- A target is another host of the source's group, in a group that declares
  ``shared_storage`` (the hosts see the same disk paths), reachable now, named by
  ``--to`` when that is given, and matching the domain's policy ``targets`` globs when
  its policy has them. Never the source.
- A domain fits a target when its memory fits in the target's free memory minus the
  target's reserve (less what this plan already sent there), its vCPUs are no more
  than the target's CPUs, and the target's committed vCPUs stay within
  ``VCPU_RATIO`` times its CPUs.
- Biggest domains are placed first (memory, then vCPUs), each on the fitting target
  with the most memory left, so domains spread across targets instead of filling the
  first one.
- A domain that fits nowhere stays, with a reason that names every candidate and why
  it was not chosen.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

MiB = 1024 * 1024
# Committed vCPUs per host CPU before a host counts as full (libvirt and Nova's
# historical default overcommit): vCPUs are time-shared, memory is not.
VCPU_RATIO = 16.0


@dataclass(frozen=True)
class HostState:
    name: str
    group: str
    shared_storage: bool
    up: bool
    error: str | None = None  # why it is down
    cpus: int = 0
    memory_free: int = 0  # bytes, as libvirt reports them
    memory_reserve: int = 0  # bytes kept for the host itself
    vcpus_used: int = 0  # vCPUs of its running domains

    @property
    def memory_usable(self) -> int:
        return max(0, self.memory_free - self.memory_reserve)


@dataclass(frozen=True)
class Candidate:
    """A domain on the source host and what its policy allows."""

    name: str
    uuid: str
    running: bool
    memory: int  # bytes
    vcpus: int
    targets: tuple[str, ...] | None = None  # host globs from its migration policy; None: any
    policy: str | None = None
    refused: str | None = None  # a reason it must not move (e.g. its policies conflict)


@dataclass(frozen=True)
class Move:
    domain: str
    uuid: str
    to: str
    memory: int
    vcpus: int
    policy: str | None = None


@dataclass(frozen=True)
class Left:
    domain: str
    uuid: str
    reason: str
    running: bool = True


@dataclass(frozen=True)
class Plan:
    source: str
    moves: tuple[Move, ...] = ()
    left: tuple[Left, ...] = ()
    targets: tuple[str, ...] = field(default=())  # the hosts that could receive domains

    @property
    def stuck(self) -> tuple[Left, ...]:
        """Running domains that stay on the source."""
        return tuple(x for x in self.left if x.running)

    def to_json(self) -> dict:
        return {"host": self.source, "targets": list(self.targets),
                "moves": [{"domain": m.domain, "uuid": m.uuid, "to": m.to, "memory_mib": m.memory // MiB,
                           "vcpus": m.vcpus, "policy": m.policy} for m in self.moves],
                "left": [{"domain": x.domain, "uuid": x.uuid, "running": x.running, "reason": x.reason}
                         for x in self.left]}


def plan_evacuation(source: str, hosts: Sequence[HostState], domains: Sequence[Candidate], *,
                    to: Sequence[str] = (), vcpu_ratio: float = VCPU_RATIO) -> Plan:
    """Which domains of ``source`` go where (see the module docstring for the rules)."""
    by_name = {h.name: h for h in hosts}
    if source not in by_name:
        raise ValueError(f"unknown source host {source!r}")
    src = by_name[source]
    pool, excluded = _pool(src, hosts, tuple(to))
    left = [Left(d.name, d.uuid, f"not running: only running domains are live-migrated; it stays defined"
                                 f" on {source}", running=False)
            for d in domains if not d.running]
    moves: list[Move] = []
    state = {h.name: h for h in pool}
    for d in sorted((d for d in domains if d.running), key=lambda d: (-d.memory, -d.vcpus, d.name)):
        if d.refused:
            left.append(Left(d.name, d.uuid, d.refused))
            continue
        if not src.shared_storage:
            left.append(Left(d.name, d.uuid, f"host {source}'s group {src.group!r} does not declare shared_storage:"
                                             " live migration needs hosts that see the same disks"))
            continue
        allowed = [h for h in state.values() if d.targets is None or _matches(h.name, d.targets)]
        if not allowed:
            left.append(Left(d.name, d.uuid, _no_target(d, state, excluded)))
            continue
        fits = {h.name: _misfit(d, h, vcpu_ratio) for h in allowed}
        good = [h for h in allowed if fits[h.name] is None]
        if not good:
            why = "; ".join(f"{name}: {fits[name]}" for name in sorted(fits))
            left.append(Left(d.name, d.uuid, f"no room on any target ({why})"))
            continue
        best = min(good, key=lambda h: (-(h.memory_usable - d.memory), h.vcpus_used, h.name))
        moves.append(Move(d.name, d.uuid, best.name, d.memory, d.vcpus, d.policy))
        state[best.name] = replace(best, memory_free=best.memory_free - d.memory,
                                   vcpus_used=best.vcpus_used + d.vcpus)
    return Plan(source, tuple(moves), tuple(sorted(left, key=lambda x: x.domain)),
                tuple(sorted(h.name for h in pool)))


def _pool(src: HostState, hosts: Sequence[HostState], to: tuple[str, ...]) -> tuple[list[HostState], list[str]]:
    """The hosts that may receive domains, and why each other host may not."""
    pool, excluded = [], []
    for h in sorted(hosts, key=lambda h: h.name):
        if h.name == src.name:
            continue
        if to and h.name not in to:
            why = "not named by --to"
        elif h.group != src.group:
            why = f"in group {h.group!r}, not {src.group!r}"
        elif not h.shared_storage:
            why = f"its group {h.group!r} does not declare shared_storage"
        elif not h.up:
            why = f"down ({h.error})" if h.error else "down"
        else:
            pool.append(h)
            continue
        excluded.append(f"{h.name}: {why}")
    return pool, excluded


def _no_target(d: Candidate, pool: dict[str, HostState], excluded: list[str]) -> str:
    if pool and d.targets is not None:
        return (f"policy {d.policy!r} allows only targets {', '.join(d.targets)}, and none of"
                f" {', '.join(sorted(pool))} matches")
    detail = "; ".join(excluded) if excluded else "no other host is configured"
    return f"no host to move to: {detail}"


def _misfit(d: Candidate, h: HostState, vcpu_ratio: float) -> str | None:
    """Why ``d`` does not fit on ``h``, or None."""
    if d.memory > h.memory_usable:
        reserve = f" after its {h.memory_reserve // MiB} MiB reserve" if h.memory_reserve else ""
        return f"needs {d.memory // MiB} MiB of memory, {h.memory_usable // MiB} MiB free{reserve}"
    if d.vcpus > h.cpus:
        return f"needs {d.vcpus} vCPUs, the host has {h.cpus} CPUs"
    limit = int(h.cpus * vcpu_ratio)
    if h.vcpus_used + d.vcpus > limit:
        return f"{h.vcpus_used} vCPUs committed, {d.vcpus} more would pass the limit of {limit}"
    return None


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def max_parallel(limits: Sequence[int | None], default: int = 2) -> int:
    """The evacuation's parallel migrations: the smallest ``max_parallel`` of the
    policies that govern its domains (a policy's limit holds for its domains' host),
    ``default`` when none says."""
    given = [n for n in limits if n]
    return min(given) if given else default
