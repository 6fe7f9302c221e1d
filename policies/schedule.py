"""Schedule maths: when each policy's jobs are due, and what to do with a due slot.

Pure functions over policies, plain domain facts and datetimes; the scheduler loop
(virtwarden/daemons/scheduler.py) does the I/O and the claiming. All datetimes given to or returned
from this module are timezone-aware; returned ones are in UTC.

Cron schedules are read as wall-clock times in the policy's ``timezone`` (like crontab
with ``CRON_TZ``), then turned into real instants. Daylight saving time changes are
decided once, here, the way cronie does it:

- Spring forward (a wall-clock hour does not exist; Europe/Paris skips 02:00-02:59 on the
  last Sunday of March): a schedule time inside the gap runs once, at the first instant
  after the gap (03:00 local time). Several times inside the gap (``*/15 2 * * *``)
  collapse into that one run, and it is not repeated when the schedule also names 03:00.
- Fall back (a wall-clock hour happens twice; Europe/Paris repeats 02:00-02:59 on the
  last Sunday of October): a schedule with a fixed hour (``30 2 * * *``) runs once, at
  the first occurrence (02:30 summer time). A schedule whose hour field is ``*``
  (hourly and more often) runs in both occurrences, so it keeps firing every real hour.

Windows: a slot may start from its time until its window ends: ``window`` after the
slot (backup and verify), and by default until the next slot. A window never reaches past
the next slot: the newer slot supersedes it, so an outage of any length produces one
catch-up run per schedule and domain, not one per missed slot.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal, cast
from zoneinfo import ZoneInfo

from croniter import croniter
from virtwarden.policies.model import JOB_SECTIONS, Backup, Drill, Job, Policy, Snapshots, Verify
from virtwarden.policies.select import DomainFacts, governing, matching

from virtwarden.errors import PolicyError

UTC = UTC
# The jobs a schedule can start, in the order the scheduler looks at them.
SCHEDULED_JOBS: tuple[Job, ...] = ("backup", "snapshot", "drill", "verify")
# Search spans for the next or previous slot: a minute schedule is found in the first,
# a 29 February one (8 years apart around 2100) in the last.
_SEARCH_SPANS = (timedelta(hours=2), timedelta(days=2), timedelta(days=40), timedelta(days=400),
                 timedelta(days=3000))
# The window of a slot whose schedule has no next slot within the search (never in practice).
NO_NEXT_WINDOW = timedelta(days=1)

Action = Literal["start", "skip", "defer"]


@dataclass(frozen=True)
class Slot:
    """One scheduled run of ``job`` for ``domain``, governed by ``policy``.

    ``host`` is where the domain was seen (the queue the job goes to); it is not part
    of the slot's identity, which is (policy, job, domain, at).
    """

    policy: str
    job: str
    domain: str
    at: datetime
    window_end: datetime
    host: str | None = None

    @property
    def key(self) -> str:
        """The slot's identity as text: the job's dedup key, so a slot makes one job at most."""
        return f"slot:{self.policy}:{self.job}:{self.domain}:{self.at.isoformat()}"


# --- cron in a time zone --------------------------------------------------------------

def slots_between(cron: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """The instants (UTC) at which ``cron``, read in time zone ``tz``, fires, with
    ``start <= t < end``, sorted, each once (see the module docstring for DST)."""
    _aware(start, "start")
    _aware(end, "end")
    if end <= start:
        return []
    zone = _zone(tz)
    low, high = _offset_range(zone, start, end)
    wall_end = _wall(end + high)
    it = croniter(cron, _wall(start + low) - timedelta(seconds=1))
    every_hour = _fires_every_hour(cron)
    found: set[datetime] = set()
    while (wall := cast(datetime, it.get_next(datetime))) <= wall_end:
        found.update(t for t in _instants(wall, zone, every_hour) if start <= t < end)
    return sorted(found)


def next_slot(cron: str, tz: str, after: datetime) -> datetime | None:
    """The first slot strictly after ``after``; None when there is none within 8 years."""
    start = after + timedelta(microseconds=1)
    for span in _SEARCH_SPANS:
        found = slots_between(cron, tz, start, start + span)
        if found:
            return found[0]
    return None


def last_slot(cron: str, tz: str, at_or_before: datetime) -> datetime | None:
    """The latest slot at or before ``at_or_before``; None when there is none within 8 years."""
    end = at_or_before + timedelta(microseconds=1)
    for span in _SEARCH_SPANS:
        found = slots_between(cron, tz, end - span, end)
        if found:
            return found[-1]
    return None


def window_end(at: datetime, window_seconds: int | None, next_at: datetime | None) -> datetime:
    """Until when the slot at ``at`` may start: ``window_seconds`` after it, by default
    until the next slot, and never past the next slot."""
    if window_seconds is None:
        return next_at if next_at is not None else at + NO_NEXT_WINDOW
    end = at + timedelta(seconds=window_seconds)
    return min(end, next_at) if next_at is not None else end


def _instants(wall: datetime, zone: ZoneInfo, every_hour: bool) -> list[datetime]:
    """The real instants of a wall-clock time: one, none-but-the-gap's-end, or two."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if _wall(first.astimezone(zone)) != wall:  # in a gap: neither reading exists
        return [_end_of_gap(wall, zone, min(first, second), max(first, second))]
    return [first, second] if every_hour else [first]


def _end_of_gap(wall: datetime, zone: ZoneInfo, low: datetime, high: datetime) -> datetime:
    """The first instant whose wall-clock time is past ``wall`` (in a gap: the transition).

    ``low`` reads as before the gap and ``high`` as after it; transitions fall on whole
    seconds, so a binary search over seconds finds it exactly.
    """
    lo, hi = 0, int((high - low).total_seconds())
    while lo < hi:
        mid = (lo + hi) // 2
        if _wall((low + timedelta(seconds=mid)).astimezone(zone)) > wall:
            hi = mid
        else:
            lo = mid + 1
    return low + timedelta(seconds=lo)


def _offset_range(zone: ZoneInfo, start: datetime, end: datetime) -> tuple[timedelta, timedelta]:
    """The smallest and largest UTC offset of ``zone`` around [start, end], to know which
    wall-clock times can map into the range."""
    t, stop = start - timedelta(days=1), end + timedelta(days=1)
    offsets = set()
    while t <= stop:
        offsets.add(t.astimezone(zone).utcoffset() or timedelta(0))
        t += timedelta(hours=1)
    return min(offsets), max(offsets)


@lru_cache(maxsize=256)
def _fires_every_hour(cron: str) -> bool:
    """Whether the hour field is '*' (croniter also writes a full range such as 0-23 so)."""
    return bool(croniter(cron).expanded[1] == ["*"])


@lru_cache(maxsize=64)
def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)


def _wall(t: datetime) -> datetime:
    return t.replace(tzinfo=None)


def _aware(t: datetime, what: str) -> None:
    if t.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (got the naive {t.isoformat()})")


# --- which slots are due ----------------------------------------------------------------

def schedule_of(policy: Policy, job: Job) -> tuple[str, str, int | None] | None:
    """(cron, timezone, window seconds) of the policy's ``job``, None without a schedule."""
    section = policy.section(job)
    if not isinstance(section, (Backup, Snapshots, Drill, Verify)) or section.schedule is None:
        return None
    window = section.window if isinstance(section, (Backup, Verify)) else None
    return section.schedule, section.timezone, window


def due(policies: Sequence[Policy], domains_by_host: Mapping[str, Iterable[DomainFacts]], now: datetime,
        since: datetime | None, *, problems: list[str] | None = None) -> list[Slot]:
    """The slots with ``since <= at <= now`` of every domain's governing policies.

    Only the policy that governs a domain for a job (policies.select.governing) makes
    slots for it, so two policies never both back up one domain. ``since`` None (first
    run, nothing recorded) looks at each schedule's latest slot only. Domains whose
    policies tie are left out and described in ``problems``.
    """
    _aware(now, "now")
    end = now + timedelta(microseconds=1)
    cache: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
    # A job no policy schedules makes no slot (and no tie about it matters): its
    # governing policy is not worked out for each domain.
    scheduled = [job for job in SCHEDULED_JOBS if any(schedule_of(p, job) for p in policies)]
    out = []
    for host, facts_list in domains_by_host.items():
        for facts in facts_list:
            for job in scheduled:
                policy = _governing(policies, facts, job, problems)
                if policy is None:
                    continue
                for at, closes in _times(cache, policy, job, since, end):
                    out.append(Slot(policy.name, job, facts.name, at, closes, host))
    return sorted(out, key=lambda s: (s.at, s.policy, s.job, s.domain))


def any_due(policies: Sequence[Policy], since: datetime, now: datetime) -> bool:
    """Whether any policy's schedule of any job has a slot with ``since <= at <= now``:
    the instants depend on the schedules alone, not on the domains (which ``due`` needs
    the hosts listed for)."""
    _aware(now, "now")
    end = now + timedelta(microseconds=1)
    return any(slots_between(s[0], s[1], since, end) for p in policies for job in SCHEDULED_JOBS
               if (s := schedule_of(p, job)))


def between(policies: Sequence[Policy], domains_by_host: Mapping[str, Iterable[DomainFacts]], start: datetime,
            end: datetime, *, problems: list[str] | None = None) -> list[Slot]:
    """The slots with ``start <= at < end`` (for ``virtwarden schedule preview``)."""
    return [s for s in due(policies, domains_by_host, end, start, problems=problems) if s.at < end]


def _governing(policies: Sequence[Policy], facts: DomainFacts, job: Job,
               problems: list[str] | None) -> Policy | None:
    try:
        return governing(policies, facts, job)
    except PolicyError as e:
        # A tie matters here only when a tied policy schedules the job.
        if problems is not None and any(schedule_of(p, job) for p in matching(policies, facts, job)):
            problems.append(str(e))
        return None


def _times(cache: dict[tuple[str, str], list[tuple[datetime, datetime]]], policy: Policy, job: Job,
           since: datetime | None, end: datetime) -> list[tuple[datetime, datetime]]:
    """(slot, window end) pairs of one policy's job, computed once per call of ``due``."""
    key = (policy.name, job)
    if key not in cache:
        schedule = schedule_of(policy, job)
        cache[key] = [] if schedule is None else _slot_times(*schedule, since, end)
    return cache[key]


def _slot_times(cron: str, tz: str, window: int | None, since: datetime | None,
                end: datetime) -> list[tuple[datetime, datetime]]:
    if since is None:
        latest = last_slot(cron, tz, end - timedelta(microseconds=1))
        times = [latest] if latest is not None else []
    else:
        times = slots_between(cron, tz, since, end)
    out = []
    for i, at in enumerate(times):
        following = times[i + 1] if i + 1 < len(times) else next_slot(cron, tz, at)
        out.append((at, window_end(at, window, following)))
    return out


# --- start, skip or defer ---------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """How many jobs may be queued or running at once when a slot of a policy starts.

    ``per_host``: jobs of the slot's kind on the slot's host, whatever policy made them
    (the host's disks and network are what the limit protects); from the section's
    ``max_parallel_per_host``. ``per_policy``: jobs of the slot's kind made for the
    slot's policy, on all hosts; from the section's ``max_parallel``. None: no limit.
    """

    per_host: int | None = None
    per_policy: int | None = None


@dataclass(frozen=True)
class Busy:
    """A queued or running job, as the limits count it."""

    kind: str
    host: str | None
    policy: str | None
    domain: str | None


@dataclass(frozen=True)
class Decision:
    slot: Slot
    action: Action
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    start: tuple[Slot, ...]
    skip: tuple[Decision, ...]
    defer: tuple[Decision, ...]


def limits_of(policies: Iterable[Policy]) -> dict[tuple[str, str], Limits]:
    """The limits of each (policy, scheduled job) that has any (``max_parallel_per_host``
    and ``max_parallel`` of spec.backup, spec.snapshots, spec.drill and spec.verify)."""
    out: dict[tuple[str, str], Limits] = {}
    for p in policies:
        for job in SCHEDULED_JOBS:
            section = getattr(p.spec, JOB_SECTIONS[job])
            if section is None or (section.max_parallel_per_host is None and section.max_parallel is None):
                continue
            out[(p.name, job)] = Limits(per_host=section.max_parallel_per_host, per_policy=section.max_parallel)
    return out


def split(slots: Iterable[Slot], now: datetime, busy: Iterable[Busy],
          limits: Mapping[tuple[str, str], Limits]) -> Plan:
    """Which due slots start now, which are skipped (window closed) and which wait
    (deferred: tried again on the next tick while their window is open).

    Slots are taken oldest first; each one started counts against the limits of the
    ones after it. A slot waits while the same job of its domain is still queued or
    running, and while a limit is reached.
    """
    running = _Running(busy)
    decisions = [_decide(slot, now, running, limits.get((slot.policy, slot.job), Limits()))
                 for slot in sorted(slots, key=lambda s: (s.at, s.policy, s.job, s.domain))]
    return Plan(tuple(d.slot for d in decisions if d.action == "start"),
                tuple(d for d in decisions if d.action == "skip"),
                tuple(d for d in decisions if d.action == "defer"))


class _Running:
    """The queued and running jobs the limits count, by what they count: each a lookup, so
    deciding a midnight's thousands of slots costs as many steps, not their square."""

    def __init__(self, busy: Iterable[Busy]) -> None:
        self.domains: set[tuple[str, str | None]] = set()
        self.on_host: Counter[tuple[str, str | None]] = Counter()
        self.of_policy: Counter[tuple[str, str | None]] = Counter()
        for b in busy:
            self.add(b)

    def add(self, b: Busy) -> None:
        self.domains.add((b.kind, b.domain))
        self.on_host[(b.kind, b.host)] += 1
        self.of_policy[(b.kind, b.policy)] += 1


def _decide(slot: Slot, now: datetime, running: _Running, limits: Limits) -> Decision:
    """One slot's decision; a started slot is added to ``running``."""
    if now >= slot.window_end:
        return Decision(slot, "skip", f"window closed at {_utc_text(slot.window_end)} before the {slot.job}"
                                      " could start")
    if (slot.job, slot.domain) in running.domains:
        return Decision(slot, "defer", f"the previous {slot.job} of {slot.domain} is still queued or running")
    on_host = running.on_host[(slot.job, slot.host)]
    if limits.per_host is not None and on_host >= limits.per_host:
        return Decision(slot, "defer", f"host {slot.host} already has {on_host} {slot.job} job(s) queued or"
                                       f" running (max_parallel_per_host {limits.per_host} in policy {slot.policy})")
    of_policy = running.of_policy[(slot.job, slot.policy)]
    if limits.per_policy is not None and of_policy >= limits.per_policy:
        return Decision(slot, "defer", f"policy {slot.policy} already has {of_policy} {slot.job} job(s) queued"
                                       f" or running (at most {limits.per_policy})")
    running.add(Busy(slot.job, slot.host, slot.policy, slot.domain))
    return Decision(slot, "start")


def _utc_text(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
