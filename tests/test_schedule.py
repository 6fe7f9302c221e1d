"""Schedule maths, pure: cron in a time zone across DST changes, windows, which policy's
slots are due, and the start / skip / defer decision. Every case is a row of a table
with the exact UTC instants expected."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from virtwarden.policies import DomainFacts, Policy
from virtwarden.policies.schedule import (
    Busy,
    Limits,
    Slot,
    due,
    last_slot,
    limits_of,
    next_slot,
    slots_between,
    split,
    window_end,
)

UTC = UTC


def T(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Europe/Paris 2025: spring forward on 30 March (02:00 CET -> 03:00 CEST, 01:00 UTC),
# fall back on 26 October (03:00 CEST -> 02:00 CET, 01:00 UTC).
SLOTS = [
    ("utc daily", "30 2 * * *", "UTC", "2025-01-01 00:00", "2025-01-03 00:00",
     ["2025-01-01 02:30", "2025-01-02 02:30"]),
    ("start included, end excluded", "*/20 * * * *", "UTC", "2025-01-01 10:00", "2025-01-01 11:00",
     ["2025-01-01 10:00", "2025-01-01 10:20", "2025-01-01 10:40"]),
    ("empty range", "* * * * *", "UTC", "2025-01-01 10:00", "2025-01-01 10:00", []),
    ("nickname", "@daily", "UTC", "2025-01-01 00:00", "2025-01-02 00:01", ["2025-01-01 00:00", "2025-01-02 00:00"]),
    ("paris winter (+01:00)", "30 2 * * *", "Europe/Paris", "2025-01-10 00:00", "2025-01-11 00:00",
     ["2025-01-10 01:30"]),
    ("paris summer (+02:00)", "30 2 * * *", "Europe/Paris", "2025-07-10 00:00", "2025-07-11 00:00",
     ["2025-07-10 00:30"]),
    # 02:30 does not exist on 30 March: once, at 03:00 CEST = 01:00 UTC.
    ("spring forward: daily 02:30 runs once at 03:00 local", "30 2 * * *", "Europe/Paris",
     "2025-03-29 00:00", "2025-04-01 00:00", ["2025-03-29 01:30", "2025-03-30 01:00", "2025-03-31 00:30"]),
    ("spring forward: several times in the gap collapse", "*/15 2 * * *", "Europe/Paris",
     "2025-03-29 12:00", "2025-03-30 12:00", ["2025-03-30 01:00"]),
    ("spring forward: no second run when 03:00 is named too", "0,30 2,3 * * *", "Europe/Paris",
     "2025-03-29 23:00", "2025-03-30 03:00", ["2025-03-30 01:00", "2025-03-30 01:30"]),
    ("spring forward: 03:00 itself is ordinary", "0 3 * * *", "Europe/Paris",
     "2025-03-29 12:00", "2025-03-30 12:00", ["2025-03-30 01:00"]),
    ("spring forward: hourly, each real hour once", "0 * * * *", "Europe/Paris",
     "2025-03-29 23:00", "2025-03-30 03:00",
     ["2025-03-29 23:00", "2025-03-30 00:00", "2025-03-30 01:00", "2025-03-30 02:00"]),
    # 02:30 happens twice on 26 October: once, at the first (02:30 CEST = 00:30 UTC).
    ("fall back: daily 02:30 runs once", "30 2 * * *", "Europe/Paris",
     "2025-10-25 00:00", "2025-10-28 00:00", ["2025-10-25 00:30", "2025-10-26 00:30", "2025-10-27 01:30"]),
    ("fall back: fixed hour, first occurrence only", "*/30 2 * * *", "Europe/Paris",
     "2025-10-25 12:00", "2025-10-26 12:00", ["2025-10-26 00:00", "2025-10-26 00:30"]),
    ("fall back: hourly runs every real hour", "0 * * * *", "Europe/Paris",
     "2025-10-25 22:00", "2025-10-26 03:00",
     ["2025-10-25 22:00", "2025-10-25 23:00", "2025-10-26 00:00", "2025-10-26 01:00", "2025-10-26 02:00"]),
    ("fall back: every 30 minutes through both 02:xx", "*/30 * * * *", "Europe/Paris",
     "2025-10-25 23:30", "2025-10-26 02:00",
     ["2025-10-25 23:30", "2025-10-26 00:00", "2025-10-26 00:30", "2025-10-26 01:00", "2025-10-26 01:30"]),
    ("new york spring forward", "30 2 * * *", "America/New_York", "2025-03-08 12:00", "2025-03-10 12:00",
     ["2025-03-09 07:00", "2025-03-10 06:30"]),
    ("new york fall back", "30 1 * * *", "America/New_York", "2025-11-01 12:00", "2025-11-03 12:00",
     ["2025-11-02 05:30", "2025-11-03 06:30"]),
    # Samoa skipped 30 December 2011 altogether (UTC-10 -> UTC+14).
    ("a whole day skipped", "0 0 * * *", "Pacific/Apia", "2011-12-29 00:00", "2011-12-31 12:00",
     ["2011-12-29 10:00", "2011-12-30 10:00", "2011-12-31 10:00"]),
]


@pytest.mark.parametrize("cron, tz, start, end, expected", [r[1:] for r in SLOTS], ids=[r[0] for r in SLOTS])
def test_slots_between(cron, tz, start, end, expected):
    assert slots_between(cron, tz, T(start), T(end)) == [T(e) for e in expected]


def test_slots_between_accepts_any_offset_and_answers_in_utc():
    start = datetime(2025, 3, 30, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    found = slots_between("30 2 * * *", "Europe/Paris", start, start + timedelta(days=1))
    assert found == [T("2025-03-30 01:00")] and found[0].tzinfo == UTC


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        slots_between("* * * * *", "UTC", datetime(2025, 1, 1), T("2025-01-02 00:00"))


NEIGHBOURS = [
    ("next over spring forward", next_slot, "30 2 * * *", "Europe/Paris", "2025-03-29 01:30", "2025-03-30 01:00"),
    ("next is strictly after", next_slot, "0 * * * *", "UTC", "2025-01-01 10:00", "2025-01-01 11:00"),
    ("next of 29 February", next_slot, "0 0 29 2 *", "UTC", "2097-01-01 00:00", "2104-02-29 00:00"),
    ("last includes the instant", last_slot, "0 * * * *", "UTC", "2025-01-01 10:00", "2025-01-01 10:00"),
    ("last over fall back", last_slot, "30 2 * * *", "Europe/Paris", "2025-10-27 00:00", "2025-10-26 00:30"),
]


@pytest.mark.parametrize("fn, cron, tz, at, expected", [r[1:] for r in NEIGHBOURS], ids=[r[0] for r in NEIGHBOURS])
def test_next_and_last_slot(fn, cron, tz, at, expected):
    assert fn(cron, tz, T(at)) == T(expected)


WINDOWS = [
    ("default: until the next slot", None, "2025-01-02 02:30", "2025-01-02 02:30"),
    ("given window", 4 * 3600, "2025-01-02 02:30", "2025-01-01 06:30"),
    ("never past the next slot", 3 * 86400, "2025-01-02 02:30", "2025-01-02 02:30"),
    ("no next slot, given window", 3600, None, "2025-01-01 03:30"),
    ("no next slot, default", None, None, "2025-01-02 02:30"),
]


@pytest.mark.parametrize("window, next_at, expected", [r[1:] for r in WINDOWS], ids=[r[0] for r in WINDOWS])
def test_window_end(window, next_at, expected):
    assert window_end(T("2025-01-01 02:30"), window, T(next_at) if next_at else None) == T(expected)


# --- which slots are due -------------------------------------------------------------------

def policy(name: str, **spec) -> Policy:
    return Policy.model_validate({"apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": name},
                                  "spec": spec})


NIGHTLY = policy("nightly", selector={"domains": ["*"]},
                 backup={"target": "nfs", "schedule": "30 2 * * *", "timezone": "Europe/Paris", "window": "4h"})
DATABASES = policy("databases", selector={"domains": ["db-*"]},
                   backup={"target": "nfs", "schedule": "0 */6 * * *", "priority": 10},
                   snapshots={"schedule": "0 * * * *"})
DOMAINS = {"kvm1": [DomainFacts("web-1", "kvm1"), DomainFacts("db-1", "kvm1")],
           "kvm2": [DomainFacts("web-2", "kvm2")]}


def keys(found: list[Slot]) -> list[tuple[str, str, str, str, str | None]]:
    return [(s.policy, s.job, s.domain, s.at.strftime("%m-%d %H:%M"), s.host) for s in found]


def test_only_the_governing_policy_makes_slots():
    found = due([NIGHTLY, DATABASES], DOMAINS, T("2025-01-10 06:00"), T("2025-01-10 00:00"))
    assert keys(found) == [
        ("databases", "backup", "db-1", "01-10 00:00", "kvm1"),
        ("databases", "snapshot", "db-1", "01-10 00:00", "kvm1"),
        ("databases", "snapshot", "db-1", "01-10 01:00", "kvm1"),
        ("nightly", "backup", "web-1", "01-10 01:30", "kvm1"),  # 02:30 Paris
        ("nightly", "backup", "web-2", "01-10 01:30", "kvm2"),
        ("databases", "snapshot", "db-1", "01-10 02:00", "kvm1"),
        ("databases", "snapshot", "db-1", "01-10 03:00", "kvm1"),
        ("databases", "snapshot", "db-1", "01-10 04:00", "kvm1"),
        ("databases", "snapshot", "db-1", "01-10 05:00", "kvm1"),
        ("databases", "backup", "db-1", "01-10 06:00", "kvm1"),  # at == now is due
        ("databases", "snapshot", "db-1", "01-10 06:00", "kvm1"),
    ]
    nightly = [s for s in found if s.policy == "nightly"]
    assert {s.window_end for s in nightly} == {T("2025-01-10 05:30")}  # 4h window
    db_backup = [s for s in found if s.job == "backup" and s.policy == "databases"][0]
    assert db_backup.window_end == T("2025-01-10 06:00")  # until the next slot


def test_a_tie_makes_no_slots_and_says_why():
    twin = policy("twin", selector={"domains": ["web-*"]}, backup={"target": "nfs", "schedule": "30 2 * * *"})
    problems: list[str] = []
    found = due([NIGHTLY, twin], DOMAINS, T("2025-01-10 06:00"), T("2025-01-10 00:00"), problems=problems)
    assert keys(found) == [("nightly", "backup", "db-1", "01-10 01:30", "kvm1")]  # web-* tie: no slots
    assert len(problems) == 2
    assert problems[0].startswith("policies 'nightly' (<memory>:1) and 'twin' (<memory>:1) both select domain"
                                  " 'web-1' for backup with priority 0")


def test_without_since_only_the_latest_slot_is_looked_at():
    found = due([NIGHTLY], {"kvm1": [DomainFacts("web-1")]}, T("2025-01-12 12:00"), None)
    assert keys(found) == [("nightly", "backup", "web-1", "01-12 01:30", "kvm1")]


def test_a_policy_without_schedule_makes_no_slots():
    on_demand = policy("on-demand", backup={"target": "nfs"}, drill={"run_for": "1m"})
    assert due([on_demand], DOMAINS, T("2025-01-12 12:00"), T("2025-01-01 00:00")) == []


def test_selection_by_host():
    only_kvm2 = policy("kvm2-only", selector={"hosts": ["kvm2"]}, snapshots={"schedule": "0 12 * * *"})
    found = due([only_kvm2], DOMAINS, T("2025-01-10 12:00"), T("2025-01-10 00:00"))
    assert keys(found) == [("kvm2-only", "snapshot", "web-2", "01-10 12:00", "kvm2")]


def test_preview_across_dst_in_due():
    hourly = policy("hourly", snapshots={"schedule": "0 * * * *", "timezone": "Europe/Paris"})
    found = due([hourly], {"h": [DomainFacts("vm")]}, T("2025-10-26 02:00"), T("2025-10-25 23:00"))
    assert [s.at for s in found] == [T("2025-10-25 23:00"), T("2025-10-26 00:00"), T("2025-10-26 01:00"),
                                     T("2025-10-26 02:00")]
    assert [s.window_end for s in found] == [s.at + timedelta(hours=1) for s in found]


# --- start, skip, defer ------------------------------------------------------------------

NOW = T("2025-01-10 03:00")


def slot(domain: str, at: str = "2025-01-10 02:00", closes: str = "2025-01-10 04:00", host: str = "kvm1",
         policy_name: str = "nightly", job: str = "backup") -> Slot:
    return Slot(policy_name, job, domain, T(at), T(closes), host)


def busy(domain: str, host: str = "kvm1", policy_name: str | None = "other", kind: str = "backup") -> Busy:
    return Busy(kind, host, policy_name, domain)


SPLITS = [
    ("open window starts", [slot("a")], [], {}, {"a": "start"}),
    ("missed while down, window still open, starts", [slot("a", "2025-01-10 00:00", "2025-01-10 03:00:01")], [],
     {}, {"a": "start"}),
    ("missed while down, window closed, skipped", [slot("a", "2025-01-10 00:00", "2025-01-10 03:00")], [], {},
     {"a": "skip"}),
    ("previous job of the domain still there", [slot("a")], [busy("a")], {}, {"a": "defer"}),
    ("a snapshot does not hold a backup", [slot("a")], [busy("a", kind="snapshot")], {}, {"a": "start"}),
    ("per-host limit counts every policy's jobs on the host",
     [slot("a"), slot("b"), slot("c"), slot("x", host="kvm2")], [busy("z")],
     {("nightly", "backup"): Limits(per_host=2)}, {"a": "start", "b": "defer", "c": "defer", "x": "start"}),
    ("per-host limit reached by slots started in the same tick",
     [slot("a"), slot("b", "2025-01-10 01:00"), slot("c", "2025-01-10 02:30")], [],
     {("nightly", "backup"): Limits(per_host=2)}, {"b": "start", "a": "start", "c": "defer"}),
    ("per-policy limit counts the policy on every host",
     [slot("a"), slot("x", host="kvm2")], [busy("z", host="kvm3", policy_name="nightly")],
     {("nightly", "backup"): Limits(per_policy=2)}, {"a": "start", "x": "defer"}),
    ("limits of one job do not hold another",
     [slot("a", job="snapshot")], [busy("z"), busy("y")], {("nightly", "backup"): Limits(per_host=1)},
     {"a": "start"}),
    ("window closed wins over a limit", [slot("a", closes="2025-01-10 02:59")], [busy("a")], {}, {"a": "skip"}),
]


@pytest.mark.parametrize("slots, running, limits, expected", [r[1:] for r in SPLITS], ids=[r[0] for r in SPLITS])
def test_split(slots, running, limits, expected):
    plan = split(slots, NOW, running, limits)
    got = {s.domain: "start" for s in plan.start}
    got.update({d.slot.domain: d.action for d in (*plan.skip, *plan.defer)})
    assert got == expected
    assert all(d.reason for d in (*plan.skip, *plan.defer))


def test_reasons_say_what_and_why():
    plan = split([slot("a"), slot("b"), slot("c", closes="2025-01-10 02:30")], NOW, [],
                 {("nightly", "backup"): Limits(per_host=1)})
    assert [s.domain for s in plan.start] == ["a"]
    assert plan.defer[0].reason == ("host kvm1 already has 1 backup job(s) queued or running"
                                    " (max_parallel_per_host 1 in policy nightly)")
    assert plan.skip[0].reason == "window closed at 2025-01-10 02:30:00Z before the backup could start"


def test_limits_come_from_each_scheduled_section():
    limited = policy("limited", backup={"target": "nfs", "schedule": "@daily", "max_parallel_per_host": 2},
                     snapshots={"schedule": "@hourly", "max_parallel": 3},
                     drill={"schedule": "@weekly", "max_parallel": 1, "max_parallel_per_host": 1})
    assert limits_of([limited, NIGHTLY]) == {("limited", "backup"): Limits(per_host=2),
                                             ("limited", "snapshot"): Limits(per_policy=3),
                                             ("limited", "drill"): Limits(per_host=1, per_policy=1)}


def test_a_per_policy_limit_counts_the_policys_jobs_on_every_host():
    limits = limits_of([policy("limited", backup={"target": "nfs", "schedule": "@daily", "max_parallel": 2})])
    running = [busy("w", host="kvm2", policy_name="limited"), busy("v", host="kvm3")]
    plan = split([slot("a", policy_name="limited"), slot("b", policy_name="limited")], T("2025-01-10 02:05"),
                 running, limits)
    assert [s.domain for s in plan.start] == ["a"]
    assert [d.slot.domain for d in plan.defer] == ["b"]
    assert "limited" in plan.defer[0].reason


def test_slot_key_is_the_dedup_key():
    assert slot("a").key == "slot:nightly:backup:a:2025-01-10T02:00:00+00:00"
