"""The evacuation planner (policies.placement): a table of cases, then properties that
hold for any fleet (hypothesis)."""
from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtwarden.policies.placement import Candidate, HostState, max_parallel, plan_evacuation

MiB = 1024 * 1024
GiB = 1024 * MiB


def host(name: str, *, group: str = "g", shared: bool = True, up: bool = True, cpus: int = 8,
         free: int = 32 * GiB, reserve: int = 0, used: int = 0) -> HostState:
    return HostState(name, group, shared, up, None if up else "connection refused", cpus, free, reserve, used)


def dom(name: str, mem: int = GiB, vcpus: int = 1, *, running: bool = True, targets=None, refused=None) -> Candidate:
    return Candidate(name, f"uuid-{name}", running, mem, vcpus, targets, "p" if targets else None, refused)


def where(plan) -> dict[str, str]:
    return {m.domain: m.to for m in plan.moves}


def why(plan, name: str) -> str:
    return next(x.reason for x in plan.left if x.domain == name)


CASES = [
    # (id, hosts, domains, --to, expected moves, {left domain: words its reason must hold})
    ("one target takes all", [host("a"), host("b")], [dom("x"), dom("y")], (),
     {"x": "b", "y": "b"}, {}),
    ("spread across equal targets", [host("a"), host("b"), host("c")], [dom("x"), dom("y")], (),
     {"x": "b", "y": "c"}, {}),
    ("most free memory wins", [host("a"), host("b", free=4 * GiB), host("c", free=8 * GiB)], [dom("x")], (),
     {"x": "c"}, {}),
    ("too big for every target", [host("a"), host("b", free=2 * GiB)], [dom("big", 4 * GiB), dom("small")], (),
     {"small": "b"}, {"big": "needs 4096 MiB of memory, 2048 MiB free"}),
    ("reserve counts", [host("a"), host("b", free=4 * GiB, reserve=3 * GiB)], [dom("x", 2 * GiB)], (),
     {}, {"x": "1024 MiB free after its 3072 MiB reserve"}),
    ("memory is used up as domains are placed", [host("a"), host("b", free=3 * GiB)],
     [dom("x", 2 * GiB), dom("y", 2 * GiB)], (), {"x": "b"}, {"y": "no room"}),
    ("biggest first", [host("a"), host("b", free=3 * GiB)], [dom("s", GiB), dom("l", 2 * GiB)], (),
     {"l": "b", "s": "b"}, {}),
    ("more vCPUs than the host has CPUs", [host("a"), host("b", cpus=2)], [dom("wide", vcpus=4)], (),
     {}, {"wide": "needs 4 vCPUs, the host has 2 CPUs"}),
    ("vCPU overcommit limit", [host("a"), host("b", cpus=1, used=16)], [dom("x")], (),
     {}, {"x": "16 vCPUs committed"}),
    ("never the source, even when alone", [host("a")], [dom("x")], (),
     {}, {"x": "no other host is configured"}),
    ("other group", [host("a"), host("b", group="other")], [dom("x")], (),
     {}, {"x": "b: in group 'other'"}),
    ("target group without shared storage", [host("a"), host("b", shared=False)], [dom("x")], (),
     {}, {"x": "does not declare shared_storage"}),
    ("source without shared storage", [host("a", shared=False), host("b", shared=False)], [dom("x")], (),
     {}, {"x": "host a's group 'g' does not declare shared_storage"}),
    ("down target", [host("a"), host("b", up=False), host("c")], [dom("x"), dom("y")], (),
     {"x": "c", "y": "c"}, {}),
    ("only down targets", [host("a"), host("b", up=False)], [dom("x")], (),
     {}, {"x": "b: down (connection refused)"}),
    ("--to narrows", [host("a"), host("b"), host("c", free=64 * GiB)], [dom("x")], ("b",),
     {"x": "b"}, {}),
    ("--to names only the source's peers", [host("a"), host("b")], [dom("x")], ("c",),
     {}, {"x": "b: not named by --to"}),
    ("policy targets", [host("a"), host("kvm-b"), host("db-c", free=64 * GiB)],
     [dom("x", targets=("kvm-*",)), dom("y")], (), {"x": "kvm-b", "y": "db-c"}, {}),
    ("policy targets match nothing", [host("a"), host("b")], [dom("x", targets=("kvm-*",))], (),
     {}, {"x": "allows only targets kvm-*"}),
    ("shut-off domains stay", [host("a"), host("b")], [dom("off", running=False), dom("on")], (),
     {"on": "b"}, {"off": "not running"}),
    ("a refused domain stays with its reason", [host("a"), host("b")], [dom("x", refused="policies conflict")], (),
     {}, {"x": "policies conflict"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_table(case) -> None:
    _, hosts, domains, to, moves, left = case
    plan = plan_evacuation("a", hosts, domains, to=to)
    assert where(plan) == moves
    assert {x.domain for x in plan.left} == set(left)
    for name, words in left.items():
        assert words in why(plan, name), why(plan, name)


def test_stuck_lists_running_domains_only() -> None:
    plan = plan_evacuation("a", [host("a"), host("b", free=0)], [dom("off", running=False), dom("on")])
    assert [x.domain for x in plan.stuck] == ["on"]
    assert plan.targets == ("b",)


def test_unknown_source_is_a_bug_in_the_caller() -> None:
    with pytest.raises(ValueError):
        plan_evacuation("nope", [host("a")], [])


def test_max_parallel_takes_the_strictest_policy() -> None:
    assert max_parallel([]) == 2
    assert max_parallel([None, 3, 1]) == 1
    assert max_parallel([4]) == 4


# --- properties -----------------------------------------------------------------------------
names = st.sampled_from(["a", "b", "c", "d", "e"])
hosts_st = st.lists(
    st.builds(host, names, group=st.sampled_from(["g", "h"]), shared=st.booleans(), up=st.booleans(),
              cpus=st.integers(1, 8), free=st.integers(0, 16).map(lambda n: n * GiB),
              reserve=st.integers(0, 2).map(lambda n: n * GiB), used=st.integers(0, 40)),
    min_size=1, max_size=5, unique_by=lambda h: h.name)
domains_st = st.lists(
    st.builds(dom, st.text("vmxyz", min_size=1, max_size=4), st.integers(1, 8).map(lambda n: n * GiB),
              st.integers(1, 6), running=st.booleans(),
              targets=st.none() | st.lists(st.sampled_from(["a", "b*", "c", "[de]"]), min_size=1,
                                           max_size=2).map(tuple)),
    max_size=8, unique_by=lambda d: d.name)


@settings(max_examples=300, deadline=None)
@given(hosts_st, domains_st, st.lists(names, max_size=2).map(tuple))
def test_any_plan_is_safe(hosts, domains, to) -> None:
    source = hosts[0]
    plan = plan_evacuation(source.name, hosts, domains, to=to)
    by_name = {h.name: h for h in hosts}
    # Every domain is either moved or left, once.
    assert sorted([m.domain for m in plan.moves] + [x.domain for x in plan.left]) == sorted(d.name for d in domains)
    assert all(x.reason for x in plan.left)
    placed_mem: dict[str, int] = {}
    placed_cpu: dict[str, int] = {}
    for m in plan.moves:
        target = by_name[m.to]
        d = next(d for d in domains if d.name == m.domain)
        assert d.running
        assert m.to != source.name
        assert target.up and target.shared_storage and source.shared_storage
        assert target.group == source.group
        assert not to or m.to in to
        assert d.targets is None or any(fnmatch.fnmatchcase(m.to, g) for g in d.targets)
        assert d.vcpus <= target.cpus
        placed_mem[m.to] = placed_mem.get(m.to, 0) + d.memory
        placed_cpu[m.to] = placed_cpu.get(m.to, 0) + d.vcpus
    for name, mem in placed_mem.items():
        assert mem <= by_name[name].memory_usable
        assert by_name[name].vcpus_used + placed_cpu[name] <= by_name[name].cpus * 16
    # The same input gives the same plan.
    assert plan_evacuation(source.name, hosts, domains, to=to) == plan
