"""Retention (policies/retention.py), pure: a table of examples for every rule with the
exact points kept, and a property test over random histories of backups and prunes."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtwarden.policies.model import Retention
from virtwarden.policies.retention import RULES, deletion_order, select_kept

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class P:
    id: str
    created_at: datetime
    chain_id: str
    parent_id: str | None
    level: str


def history(*spec: str) -> list[P]:
    """Points from 'id@time' (a full) or 'id@time<parent' (an incremental), oldest first.
    Times are ISO 8601; without an offset they are UTC."""
    out: list[P] = []
    chains: dict[str, str] = {}
    for item in spec:
        ident, rest = item.split("@")
        when, _, parent = rest.partition("<")
        t = datetime.fromisoformat(when)
        t = t if t.tzinfo else t.replace(tzinfo=UTC)
        chains[ident] = chains[parent] if parent else ident
        out.append(P(ident, t, chains[ident], parent or None, "incremental" if parent else "full"))
    return out


CASES = [
    # (name, history, rules, kept ids)
    ("no retention keeps all", history("a@2024-05-01T10:00", "b@2024-05-02T10:00"), None, "a b"),
    ("keep_last", history("a@2024-05-01T10:00", "b@2024-05-01T11:00", "c@2024-05-01T12:00",
                          "d@2024-05-01T13:00"), {"keep_last": 2}, "c d"),
    ("keep_last larger than history", history("a@2024-05-01T10:00", "b@2024-05-01T11:00"), {"keep_last": 5}, "a b"),
    ("keep_last keeps a chain whole", history("f@2024-05-01T10:00", "i1@2024-05-01T11:00<f",
                                              "i2@2024-05-01T12:00<i1"), {"keep_last": 1}, "f i1 i2"),
    # hour 12 holds no point, so it does not count: the two most recent hours WITH points
    ("keep_hourly skips empty hours", history("a@2024-05-01T10:05", "b@2024-05-01T10:40", "c@2024-05-01T11:10",
                                              "d@2024-05-01T11:50", "e@2024-05-01T13:00"), {"keep_hourly": 2}, "d e"),
    ("keep_daily", history("a@2024-05-01T09:00", "b@2024-05-01T18:00", "c@2024-05-02T08:00", "d@2024-05-05T07:00",
                           "e@2024-05-05T23:59:59", "f@2024-05-07T00:00"), {"keep_daily": 3}, "c e f"),
    # 2024-12-30 is a Monday in ISO week 2025-W01, with 2025-01-05
    ("keep_weekly across the year end", history("a@2024-12-23T10:00", "b@2024-12-29T10:00", "c@2024-12-30T10:00",
                                                "d@2025-01-05T10:00", "e@2025-01-06T10:00"),
     {"keep_weekly": 3}, "b d e"),
    ("keep_monthly", history("a@2024-01-31T23:00", "b@2024-02-01T00:00", "c@2024-02-29T12:00", "d@2024-03-15T00:00"),
     {"keep_monthly": 2}, "c d"),
    ("keep_yearly", history("a@2022-06-01T00:00", "b@2023-01-01T00:00", "c@2023-12-31T23:59", "d@2024-01-01T00:00"),
     {"keep_yearly": 2}, "c d"),
    # 01:00 at +02:00 is 23:00 UTC the day before: one UTC day, whose newest point is b
    ("days are UTC days", history("a@2024-05-01T10:00", "b@2024-05-02T01:00+02:00"), {"keep_daily": 1}, "b"),
    # each rule alone: last keeps d, daily keeps d and b (borg would count d only once)
    ("rules are independent", history("a@2024-05-01T10:00", "b@2024-05-01T20:00", "c@2024-05-02T09:00",
                                      "d@2024-05-02T21:00"), {"keep_last": 1, "keep_daily": 2}, "b d"),
    ("a full kept because an incremental needs it",
     history("f1@2024-05-01T01:00", "i1@2024-05-02T01:00<f1", "f2@2024-05-03T01:00", "i2@2024-05-04T01:00<f2",
             "i3@2024-05-05T01:00<i2"), {"keep_daily": 2}, "f2 i2 i3"),
    ("an old chain kept by a coarse rule", history("f1@2024-01-01T00:00", "i1@2024-01-20T00:00<f1",
                                                   "f2@2024-02-01T00:00", "i2@2024-02-10T00:00<f2"),
     {"keep_monthly": 2}, "f1 i1 f2 i2"),
    ("empty history", [], {"keep_last": 3}, ""),
]


@pytest.mark.parametrize("name,points,rules,kept", CASES, ids=[c[0] for c in CASES])
def test_kept_points(name, points, rules, kept):
    result = select_kept(points, Retention(**rules) if rules is not None else None, NOW)
    assert sorted(result.kept) == sorted(kept.split())
    assert [d.id for d in result.decisions] == [p.id for p in points]
    assert set(result.doomed) == {p.id for p in points} - result.kept


def test_reasons_name_the_rule_the_period_and_the_point_that_needs_it():
    points = history("f@2024-05-01T10:00", "i1@2024-05-02T10:00<f", "i2@2024-05-03T10:00<i1",
                     "g@2024-05-03T12:00")
    result = select_kept(points, Retention(keep_last=1, keep_daily=2, keep_weekly=1), NOW)
    assert result.decision("g").rules == ("last", "daily", "weekly")
    assert result.decision("g").why == "last (1 of 1); daily (2024-05-03); weekly (2024-W18)"
    assert result.decision("i1").rules == ("daily",)
    assert result.decision("f").why == "needed by i1"
    assert result.decision("i2").why == "no rule keeps it" and not result.decision("i2").keep


def test_needed_by_names_the_nearest_point_a_rule_kept():
    points = history("f@2024-05-01T10:00", "i1@2024-05-01T11:00<f", "i2@2024-05-01T12:00<i1")
    result = select_kept(points, Retention(keep_last=1), NOW)
    assert [result.decision(i).why for i in ("f", "i1")] == ["needed by i2", "needed by i2"]


def test_no_rules_keep_everything_and_say_so():
    result = select_kept(history("a@2024-05-01T10:00"), None, NOW)
    assert result.decision("a").why == "no retention rules: keep everything"


def test_pinned_and_future_points_are_kept_with_their_chains():
    points = history("f1@2024-05-01T10:00", "i1@2024-05-01T11:00<f1", "f2@2024-05-01T12:00",
                     "f3@2031-01-01T00:00")
    result = select_kept(points, Retention(keep_last=1), NOW, pinned=["i1"])
    assert result.kept == {"f1", "i1", "f3"}
    assert result.decision("i1").rules == ("pinned",) and result.decision("f1").why == "needed by i1"
    assert "stamped after now" in result.decision("f3").why
    assert result.doomed == ("f2",)


def test_equal_times_the_later_input_is_newer():
    points = history("a@2024-05-01T10:00", "b@2024-05-01T10:00")
    assert select_kept(points, Retention(keep_last=1), NOW).kept == {"b"}


def test_deletion_goes_children_first_even_when_clocks_disagree():
    points = history("f@2024-05-01T10:00", "i1@2024-05-01T09:00<f", "i2@2024-05-01T08:00<i1",
                     "g@2024-05-01T07:00")
    assert deletion_order(points, ["f", "i1", "i2", "g"]) == ("i2", "i1", "f", "g")


# --- property: random histories of backups and prunes -----------------------------------------

PERIOD_KEYS = {  # independent of the module's own period names: plain tuples
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: t.date(),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def expected_by_rule(points: list[P], rule: str, n: int) -> set[str]:
    newest_first = sorted(points, key=lambda p: p.created_at, reverse=True)
    if rule == "last":
        return {p.id for p in newest_first[:n]}
    key = PERIOD_KEYS[rule]
    recent = sorted({key(p.created_at) for p in points}, reverse=True)[:n]
    return {next(p.id for p in newest_first if key(p.created_at) == k) for k in recent}


def closure(points: list[P], ids: set[str]) -> set[str]:
    parent = {p.id: p.parent_id for p in points}
    out = set(ids)
    while True:
        more = {parent[i] for i in out if parent[i] is not None} - out
        if not more:
            return out
        out |= more


def restorable(points: list[P], point_id: str) -> bool:
    """Its chain is all there, down to a full."""
    by_id = {p.id: p for p in points}
    current: str | None = point_id
    while current is not None:
        if current not in by_id:
            return False
        if by_id[current].level == "full":
            return True
        current = by_id[current].parent_id
    return False


# The policy schema refuses a retention that keeps nothing: at least one rule above 0.
retentions = (st.fixed_dictionaries({f"keep_{r}": st.integers(0, 4) for r in RULES})
              .filter(lambda d: any(d.values())).map(lambda d: Retention(**d)))
gaps = st.one_of(st.integers(1, 2 * 3600), st.integers(1, 3 * 86400), st.integers(1, 60 * 86400))
backup = st.tuples(st.just("backup"), st.booleans(), gaps)
prune = st.tuples(st.just("prune"), retentions)


@settings(max_examples=300, deadline=None)
@given(start=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 1, 1)),
       steps=st.lists(st.one_of(backup, prune), min_size=1, max_size=40))
def test_random_backups_and_prunes(start, steps):
    now = start.replace(tzinfo=UTC)
    alive: list[P] = []
    for n, step in enumerate(steps):
        if step[0] == "backup":
            _, full, gap = step
            now += timedelta(seconds=gap)
            parent = alive[-1] if alive and not full else None
            alive.append(P(f"p{n}", now, parent.chain_id if parent else f"c{n}", parent.id if parent else None,
                           "incremental" if parent else "full"))
            continue
        rules = step[1]
        result = select_kept(alive, rules, now)
        # Each rule keeps exactly what it says; the kept set is their union, closed.
        chosen: set[str] = set()
        for rule in RULES:
            want = expected_by_rule(alive, rule, getattr(rules, f"keep_{rule}"))
            assert {d.id for d in result.decisions if rule in d.rules} == want, rule
            chosen |= want
        assert result.kept == closure(alive, chosen)
        assert {d.id for d in result.decisions if d.rules == ("needed",)} == result.kept - chosen
        if alive:
            assert alive[-1].id in result.kept
        # Interrupted after any number of deletions, every remaining point restores.
        for cut in range(len(result.doomed) + 1):
            gone = set(result.doomed[:cut])
            remaining = [p for p in alive if p.id not in gone]
            assert all(restorable(remaining, p.id) for p in remaining), (cut, result.doomed)
        alive = [p for p in alive if p.id in result.kept]
        # Pruning again with the same rules deletes nothing more.
        assert select_kept(alive, rules, now).kept == {p.id for p in alive}
