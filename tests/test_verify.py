"""The decisions of verification, as pure functions: which points a sample re-reads, and
that a chain with a damaged point is never continued. (The end-to-end behaviour on real
guests and workers is in tests/test_integrity.py.)"""
from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from virtwarden.catalog.points import ArtifactView, PointView
from virtwarden.hypervisor.types import Disk, DomainInfo
from virtwarden.tasks.backup import BackupRequest, plan_level
from virtwarden.tasks.verify import choose_sample

MiB = 1024 * 1024
T0 = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)


def _point(pid: str, seq: int, *, disks: int = 1, verified: int | None = None, parent: str | None = None,
           status: str = "complete") -> PointView:
    return PointView(id=pid, domain="web01", domain_uuid="u-1", host="local", storage="nfs", strategy="bitmap",
                     chain_id="c1", parent_id=parent, seq=seq, level="incremental" if seq else "full",
                     status=status, reason=None, consistency="crash", checkpoint=f"cp-{pid}",
                     manifest_key=f"web01/c1/{pid}/manifest.json", size_bytes=100, job_id=None,
                     created_at=T0 + timedelta(minutes=seq), completed_at=None,
                     artifacts=tuple(ArtifactView(f"vd{chr(97 + i)}", f"web01/c1/{pid}/vd{chr(97 + i)}.qcow2", 100,
                                                  "ab" * 32, 64 * MiB) for i in range(disks)),
                     verified_at=None if verified is None else T0 + timedelta(days=verified))


def test_a_full_sample_rereads_every_point_parents_first():
    found = [_point(f"p{i}", i) for i in range(5)]
    assert choose_sample(found, 100, random.Random(1)) == tuple(found)


def test_a_sample_takes_never_verified_points_first_then_the_least_recently_verified():
    found = [_point("p0", 0, verified=3), _point("p1", 1), _point("p2", 2, verified=1), _point("p3", 3),
             _point("p4", 4, verified=2)]
    for seed in range(20):
        rng = random.Random(seed)
        assert {p.id for p in choose_sample(found, 40, rng)} == {"p1", "p3"}  # 2 of 5 artifacts
        assert [p.id for p in choose_sample(found, 60, rng)][-1] == "p3"
        assert {p.id for p in choose_sample(found, 60, rng)} == {"p1", "p3", "p2"}
        assert {p.id for p in choose_sample(found, 80, rng)} == {"p1", "p3", "p2", "p4"}


def test_a_sample_is_random_among_points_verified_alike_and_rounds_up_to_whole_points():
    found = [_point(f"p{i}", i, disks=2) for i in range(10)]  # 20 artifacts
    picks = {choose_sample(found, 10, random.Random(seed))[0].id for seed in range(40)}
    assert len(picks) > 3  # not always the same point
    assert [len(choose_sample(found, pct, random.Random(0))) for pct in (1, 5, 10, 11, 50)] == [1, 1, 1, 2, 5]
    assert choose_sample([], 10, random.Random(0)) == ()


def test_a_chain_with_a_damaged_point_is_never_continued_and_the_reason_names_it():
    head = _point("p0", 0)
    damaged = replace(_point("p1", 1, parent="p0", status="damaged"), damage="web01/c1/p1/vda.qcow2: sha256 differs")
    dom = DomainInfo("web01", "u-1", "running", True, (Disk("vda", "/a", "qcow2", "file", 64 * MiB),), "")
    req = BackupRequest(domain="web01", storage="nfs")

    assert plan_level(req, dom, head, {"cp-p0"}).level == "incremental"  # what it would be otherwise
    plan = plan_level(req, dom, head, {"cp-p0"}, damaged=damaged)
    assert plan.level == "full" and plan.parent is None
    assert plan.reason == ("restore point p1 of the last chain is damaged (web01/c1/p1/vda.qcow2: sha256 differs);"
                           " starting a new chain")
    assert plan_level(replace(req, force_full=True), dom, head, {"cp-p0"}, damaged=damaged).reason \
        == "full backup requested"
    assert "damaged" in plan_level(req, dom, None, set(), damaged=damaged).reason

    from virtwarden.tasks.blockcommit import plan_blockcommit

    tracked = plan_blockcommit(replace(req, strategy="blockcommit"), dom, head, {}, [], None, damaged)
    assert tracked.level == "full" and tracked.reason == plan.reason  # the blockcommit plan says the same
