"""Which restore points a retention policy keeps, and why. Pure: plain data in, a
decision per point out; the prune job (tasks/prune.py) does the deleting.

The rules (``policies.model.Retention``) read like restic's ``forget``:

- ``keep_last N``: the N newest points.
- ``keep_hourly``/``keep_daily``/``keep_weekly``/``keep_monthly``/``keep_yearly N``:
  the newest point of each of the N most recent hours (days, ...) *that hold a point*.
  Periods without a point do not count: with ``keep_daily: 7`` and backups on only three
  of the last seven days, the newest point of each of the last seven days that had a
  backup is kept, however far back that goes.
- Rules are independent and a point is kept when any rule keeps it; a point kept by
  several rules counts for each. (borg counts a point only for the first rule that keeps
  it, so there ``keep_daily: 7`` plus ``keep_weekly: 4`` reach further back; here each
  rule alone says what it keeps, which is what an operator reads in the policy.)
- Periods are UTC calendar periods: hours, days, ISO 8601 weeks (Monday to Sunday, with
  the ISO year: 2024-12-30 is in 2025-W01), months and years. UTC, not the policy's
  time zone, so that a DST change or a time-zone edit never moves a point to another
  day and silently changes what is kept.
- An incremental restores only on top of its parent: every ancestor of a kept point is
  kept ("needed by" the nearest kept point a rule chose). The kept set is therefore
  closed, and deleting the rest can never break a point that stays.
- The newest point is always kept; so is a point stamped after ``now`` (a host clock
  running ahead), left for a later prune to judge; so are ``pinned`` points (the parent
  a running backup builds on) with their chains.
- No rules (``None``, a policy without ``retention``) keeps everything.

Callers pass the complete points of one chain group (one domain, storage target and
strategy), oldest first; equal times are ordered by that input order. A parent that is
not among the points given (not complete) is not followed: such a point cannot be
restored anyway, and deciding about it is not retention's business.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from virtwarden.policies.model import Retention

# The periodic rules, from the finest to the coarsest: the Retention field, and how a
# UTC time names its period (names sort like the periods they name).
PERIODS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}
RULES = ("last", *PERIODS)


class PointLike(Protocol):
    """What retention looks at (catalog.points.PointView is one)."""

    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def chain_id(self) -> str: ...
    @property
    def parent_id(self) -> str | None: ...
    @property
    def level(self) -> str: ...


@dataclass(frozen=True)
class Reason:
    """One cause of a decision.

    ``rule``: last, hourly, daily, weekly, monthly, yearly (``detail`` names the
    period, or the rank for last); needed (``detail``: the kept point that needs it);
    newest, future, pinned, all (no retention rules); none (nothing keeps it).
    """

    rule: str
    detail: str = ""

    def __str__(self) -> str:
        text = {"needed": "needed by {}", "newest": "newest point", "future": "stamped after now ({})",
                "pinned": "a running backup builds on it, or a restore or drill under way reads it",
                "all": "no retention rules: keep everything",
                "none": "no rule keeps it"}.get(self.rule, self.rule + " ({})")
        return text.format(self.detail) if "{}" in text else text


@dataclass(frozen=True)
class Decision:
    id: str
    keep: bool
    reasons: tuple[Reason, ...]

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(r.rule for r in self.reasons)

    @property
    def why(self) -> str:
        return "; ".join(str(r) for r in self.reasons)


@dataclass(frozen=True)
class KeptSet:
    """A decision for every point given, in the order given, and the deletion order."""

    decisions: tuple[Decision, ...]
    # The points to delete, each after every point that depends on it (deepest in its
    # chain first): an interruption at any moment leaves every remaining chain whole.
    doomed: tuple[str, ...]

    @property
    def kept(self) -> frozenset[str]:
        return frozenset(d.id for d in self.decisions if d.keep)

    def decision(self, point_id: str) -> Decision:
        return next(d for d in self.decisions if d.id == point_id)


def select_kept(points: Sequence[PointLike], rules: Retention | None, now: datetime,
                pinned: Iterable[str] = ()) -> KeptSet:
    """Decide, for each of ``points`` (oldest first), whether ``rules`` keep it and why."""
    order = sorted(range(len(points)), key=lambda i: (_utc(points[i].created_at), i), reverse=True)
    newest_first = [points[i] for i in order]
    because: dict[str, list[Reason]] = {p.id: [] for p in points}
    for point_id, reason in _rule_reasons(newest_first, rules, now, set(pinned)):
        if point_id in because:
            because[point_id].append(reason)
    if newest_first and not because[newest_first[0].id]:
        because[newest_first[0].id].append(Reason("newest"))  # a safety net: any valid rule keeps it already
    chosen = [p.id for p in newest_first if because[p.id]]
    needed = _dependencies(points, chosen, because)
    decisions = tuple(Decision(p.id, True, tuple(because[p.id]) or (Reason("needed", needed[p.id]),))
                      if because[p.id] or p.id in needed else Decision(p.id, False, (Reason("none"),))
                      for p in points)
    kept = {d.id for d in decisions if d.keep}
    return KeptSet(decisions, deletion_order(points, [p.id for p in newest_first if p.id not in kept]))


def _rule_reasons(newest_first: list[PointLike], rules: Retention | None, now: datetime,
                  pinned: set[str]) -> Iterable[tuple[str, Reason]]:
    if not newest_first:
        return
    if rules is None:
        yield from ((p.id, Reason("all")) for p in newest_first)
        return
    for rank, p in enumerate(newest_first[:rules.keep_last], 1):
        yield p.id, Reason("last", f"{rank} of {rules.keep_last}")
    for rule, period_of in PERIODS.items():
        yield from _periodic(newest_first, rule, period_of, getattr(rules, f"keep_{rule}"))
    now = _utc(now)
    for p in newest_first:
        if _utc(p.created_at) > now:
            yield p.id, Reason("future", _utc(p.created_at).isoformat())
        if p.id in pinned:
            yield p.id, Reason("pinned")


def _periodic(newest_first: list[PointLike], rule: str, period_of: Callable[[datetime], str],
              count: int) -> Iterable[tuple[str, Reason]]:
    """The newest point of each of the ``count`` most recent periods that hold one."""
    seen: set[str] = set()
    for p in newest_first:
        if len(seen) >= count:
            return
        period = period_of(_utc(p.created_at))
        if period not in seen:
            seen.add(period)
            yield p.id, Reason(rule, period)


def _dependencies(points: Sequence[PointLike], chosen: list[str],
                  because: dict[str, list[Reason]]) -> dict[str, str]:
    """Ancestors of chosen points that no rule keeps -> the nearest chosen point that
    needs them. ``chosen`` is newest first, so each walk stops at the first ancestor
    that is already kept: an older chosen point walks on from there itself."""
    by_id = {p.id: p for p in points}
    needed: dict[str, str] = {}
    for start in chosen:
        current = by_id[start].parent_id
        while current in by_id and not because[current] and current not in needed:
            needed[current] = start
            current = by_id[current].parent_id
    return needed


def deletion_order(points: Sequence[PointLike], doomed: Iterable[str]) -> tuple[str, ...]:
    """``doomed`` ordered so that every point comes before its parent: the deepest in
    its chain first, newest first among equals. Clock-proof: depth, not time, decides."""
    by_id = {p.id: p for p in points}
    index = {p.id: i for i, p in enumerate(points)}

    def depth(point_id: str) -> int:
        seen = {point_id}
        parent = by_id[point_id].parent_id
        while parent in by_id and parent not in seen:  # `seen`: a guard against a corrupt cycle
            seen.add(parent)
            parent = by_id[parent].parent_id
        return len(seen) - 1

    return tuple(sorted(doomed, key=lambda i: (depth(i), _utc(by_id[i].created_at), index[i]), reverse=True))


def _utc(t: datetime) -> datetime:
    """Times are UTC; a naive time is taken to be UTC already (the catalog stores UTC)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
