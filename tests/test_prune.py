"""Prune (tasks/prune.py, virtwarden/submit/prune.py): retention applied to real restore points.

- Without libvirt: points with small real artifacts and manifests in a real catalog
  (SQLite) and a real repository (a directory, and S3 on the test endpoint), pruned
  with a simulated power cut before every storage operation in turn (one per step on
  S3, which is slower), and under random histories of backups and prunes. After every
  interruption, every point listed as complete still restores as far as storage goes:
  its chain is complete in the catalog, every manifest is there and matches, every
  image's SHA-256 checks.
- With libvirt: a real guest, a real worker and a policy file; ``prune --dry-run``
  changes nothing, an interrupted prune and then ``prune --wait`` leave exactly what
  the policy keeps, and every listed point restores bit for bit.
"""
from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from virtwarden.catalog import points
from virtwarden.catalog.models import RestorePoint
from virtwarden.catalog.points import ArtifactView, PointView
from virtwarden.catalog.store import Catalog
from virtwarden.policies.model import Retention
from virtwarden.policies.retention import RULES, select_kept
from virtwarden.storage_backends import open_backend
from virtwarden.storage_backends.nfs import NfsBackend
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.context import JobContext
from virtwarden.tasks.prune import DomainRules, prune_all

from tests.guests import images_equal
from virtwarden.config import NfsStorage, load
from virtwarden.errors import ObjectNotFound

MiB = 1024 * 1024
START = datetime(2024, 1, 1, tzinfo=UTC)


class PowerCut(BaseException):
    """The process died here (BaseException: nothing in the code under test catches it)."""


class CutAfter:
    """A real backend that dies before its ``ops``-th deleting operation (``delete`` or
    ``cleanup_incomplete``); None: never. Everything else goes straight through."""

    def __init__(self, backend, ops: int | None) -> None:
        self._backend, self.left, self.done = backend, ops, 0

    def _step(self) -> None:
        if self.left is not None and self.done >= self.left:
            raise PowerCut(f"power cut before storage operation {self.done}")
        self.done += 1

    def delete(self, key: str) -> None:
        self._step()
        self._backend.delete(key)

    def cleanup_incomplete(self, prefix: str = "") -> int:
        self._step()
        return self._backend.cleanup_incomplete(prefix)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def context(cat: Catalog, backend, tmp: Path, cut: int | None = None) -> tuple[JobContext, CutAfter]:
    wrapped = CutAfter(backend, cut)
    return JobContext(job_id="prune-test", catalog=cat, hypervisor=None, storage=lambda _name: wrapped,
                      scratch_root=tmp), wrapped


def add_point(cat: Catalog, repo: Repository, domain: str, when: datetime, parent: PointView | None) -> PointView:
    """A complete point as a backup leaves it: image stored, manifest last, row complete."""
    pid, chain = str(uuid.uuid4()), parent.chain_id if parent else str(uuid.uuid4())
    prefix = repo.point_prefix(domain, chain, pid)
    level = "incremental" if parent else "full"
    points.begin(cat, id=pid, domain=domain, domain_uuid=f"uuid-{domain}", host="local", storage="nfs",
                 strategy="bitmap", chain_id=chain, parent_id=parent.id if parent else None,
                 seq=parent.seq + 1 if parent else 0, level=level, reason="test", checkpoint=None,
                 manifest_key=repo.manifest_key(prefix), job_id=None)
    stored = repo.backend.put_bytes(repo.artifact_key(prefix, "vda"), os.urandom(300))
    repo.write_manifest(prefix, {"point_id": pid, "chain_id": chain, "parent_id": parent.id if parent else None,
                                 "level": level, "disks": [{"target": "vda", "mode": level, "key": stored.key,
                                                            "size_bytes": stored.size, "sha256": stored.sha256}]})
    points.complete(cat, pid, [ArtifactView("vda", stored.key, stored.size, stored.sha256, 300)], consistency="crash")
    with cat.session() as s:
        s.execute(update(RestorePoint).where(RestorePoint.id == pid).values(created_at=when))
    return points.get(cat, pid)


def assert_listed_points_restore(cat: Catalog, repo: Repository, domain: str) -> None:
    """What a restore checks before it writes anything, for every complete point."""
    for p in points.for_domain(cat, domain, statuses=(points.COMPLETE,)):
        for link in points.chain_to(cat, p.id):  # raises when a link is not complete
            manifest = repo.read_manifest(link.manifest_key)
            assert manifest["point_id"] == link.id
            for disk, art in zip(manifest["disks"], link.artifacts, strict=False):
                assert (disk["key"], disk["sha256"]) == (art.key, art.sha256)
                repo.backend.verify(art.key, art.sha256)


def assert_pruned(cat: Catalog, repo: Repository, domain: str, kept: set[str]) -> None:
    rows = points.for_domain(cat, domain)
    assert {p.id for p in rows if p.status == points.COMPLETE} == kept
    assert {p.status for p in rows if p.id not in kept} <= {points.DELETED}
    for p in rows:
        if p.id not in kept:
            assert not list(repo.backend.list(p.manifest_key.rsplit("/", 1)[0] + "/")), p.id
    assert_listed_points_restore(cat, repo, domain)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    cat = Catalog(f"sqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}")
    yield cat
    cat.close()


@pytest.fixture
def backend(request, tmp_path):
    if request.param == "nfs":
        store = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repository"), create=True))
    else:
        from virtwarden.storage_backends.s3 import S3Backend

        store = S3Backend("nfs", request.getfixturevalue("s3_settings"))
    yield store
    store.close()


# Each doomed point takes three storage operations (manifest, image, unfinished uploads);
# three points go. Every cut on the directory; on S3 (slower), one in each step.
CUTS = {"nfs": [*range(9), None], "s3": [0, 1, 2, None]}


@pytest.mark.parametrize("backend", ["nfs", "s3"], indirect=True)
def test_power_cut_at_every_step_leaves_every_listed_point_restorable(catalog, backend, tmp_path, request):
    """keep_last 2 over full, inc, inc, full, inc: the first chain goes, the second full
    stays because the kept incremental needs it. Cut the power before each storage
    operation of that prune in turn; then prune again, to the end."""
    repo = Repository(backend)
    rules = Retention(keep_last=2)
    for cut in CUTS[request.node.callspec.params["backend"]]:
        domain = f"dom-{uuid.uuid4().hex[:8]}"
        made: list[PointView] = []
        for step, full in enumerate([True, False, False, True, False]):
            made.append(add_point(catalog, repo, domain, START + timedelta(hours=step), None if full else made[-1]))
        ctx, wrapped = context(catalog, backend, tmp_path, cut)
        try:
            report = prune_all(ctx, DomainRules(domain, "p", rules, "test"), START + timedelta(days=1))
            assert cut is None and wrapped.done == 9
            assert report["deleted"] == [made[2].id, made[1].id, made[0].id]  # children first
        except PowerCut:
            statuses = [p.status for p in points.for_domain(catalog, domain)]
            assert statuses.count(points.DELETING) == 1, statuses
            assert_listed_points_restore(catalog, repo, domain)
            ctx, _ = context(catalog, backend, tmp_path)
            prune_all(ctx, DomainRules(domain, "p", rules, "test"), START + timedelta(days=1))
        assert_pruned(catalog, repo, domain, {made[3].id, made[4].id})


def test_leftovers_of_a_failed_backup_go_after_a_day(catalog, tmp_path):
    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repository"), create=True))
    repo = Repository(backend)
    domain = f"dom-{uuid.uuid4().hex[:8]}"
    kept = add_point(catalog, repo, domain, START, None)
    failed = add_point(catalog, repo, domain, START + timedelta(hours=1), kept)
    with catalog.session() as s:  # as when the backup's own cleanup failed after the manifest was written
        s.execute(update(RestorePoint).where(RestorePoint.id == failed.id).values(status=points.FAILED))
    ctx, _ = context(catalog, backend, tmp_path)
    rules = DomainRules(domain, None, None, "no policy")
    assert prune_all(ctx, rules, START + timedelta(hours=2))["swept"] == 0
    assert repo.backend.exists(failed.manifest_key)
    assert prune_all(ctx, rules, START + timedelta(days=2))["swept"] == 1
    assert not list(repo.backend.list(failed.manifest_key.rsplit("/", 1)[0] + "/"))
    assert points.get(catalog, failed.id).status == points.FAILED  # the record stays, with its reason
    assert_listed_points_restore(catalog, repo, domain)


def test_a_point_a_drill_is_restoring_is_kept_with_its_chain(catalog, tmp_path):
    """A drill takes no domain lock; a prune meanwhile keeps the point it restores (and
    what that point needs), and forgets the pin once the drill's job is not running."""
    from virtwarden.catalog import drills
    from virtwarden.catalog import jobs as job_rows
    from virtwarden.tasks.prune import plan_domain

    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repository"), create=True))
    repo = Repository(backend)
    domain = f"dom-{uuid.uuid4().hex[:8]}"
    full = add_point(catalog, repo, domain, START, None)
    inc = add_point(catalog, repo, domain, START + timedelta(hours=1), full)
    newest = add_point(catalog, repo, domain, START + timedelta(hours=2), None)
    job = job_rows.create(catalog, kind="drill", domain=domain, host="local", params={})
    taken = job_rows.claim(catalog, job.id, "drill-worker", 60, lock_domain=False)
    assert taken.ok
    drills.begin(catalog, drill_id=job.id, domain=domain, host="local", point_id=inc.id,
                 throwaway="virtwarden-drill-test")
    now = START + timedelta(days=1)

    [plan] = plan_domain(catalog, domain, Retention(keep_last=1), now)
    assert plan.kept.kept == {full.id, inc.id, newest.id}
    assert "a restore or drill under way reads it" in plan.kept.decision(inc.id).why
    assert job_rows.finish(catalog, taken.fence, ok=True, result={})
    [plan] = plan_domain(catalog, domain, Retention(keep_last=1), now)
    assert plan.kept.kept == {newest.id}


def test_a_point_a_queued_or_running_restore_will_read_is_kept_with_its_chain(catalog, tmp_path):
    """Retention that runs while a restore waits in the queue or copies must not delete
    the point it restores (the chaos run saw restores fail on points pruned under them)."""
    from virtwarden.catalog import jobs as job_rows
    from virtwarden.tasks.prune import plan_domain

    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repository"), create=True))
    repo = Repository(backend)
    domain = f"dom-{uuid.uuid4().hex[:8]}"
    full = add_point(catalog, repo, domain, START, None)
    inc = add_point(catalog, repo, domain, START + timedelta(hours=1), full)
    newest = add_point(catalog, repo, domain, START + timedelta(hours=2), None)
    job = job_rows.create(catalog, kind="restore", domain=domain, host="local",
                          params={"domain": domain, "point": inc.id, "to_dir": str(tmp_path / "out")})
    now = START + timedelta(days=1)
    [plan] = plan_domain(catalog, domain, Retention(keep_last=1), now)
    assert plan.kept.kept == {full.id, inc.id, newest.id}  # queued
    taken = job_rows.claim(catalog, job.id, "w", 60, lock_domain=False)
    [plan] = plan_domain(catalog, domain, Retention(keep_last=1), now)
    assert plan.kept.kept == {full.id, inc.id, newest.id}  # running
    job_rows.finish(catalog, taken.fence, ok=True, result={})
    [plan] = plan_domain(catalog, domain, Retention(keep_last=1), now)
    assert plan.kept.kept == {newest.id}


def test_damaged_points_take_no_place_in_retention_pin_nothing_and_go_when_retention_would_have_removed_them(
        catalog, tmp_path):
    from virtwarden.tasks.prune import plan_domain

    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp_path / "repository"), create=True))
    repo = Repository(backend)
    domain = f"dom-{uuid.uuid4().hex[:8]}"
    full = add_point(catalog, repo, domain, START, None)
    first = add_point(catalog, repo, domain, START + timedelta(hours=1), full)
    second = add_point(catalog, repo, domain, START + timedelta(hours=2), first)
    new_full = add_point(catalog, repo, domain, START + timedelta(days=1), None)
    newest = add_point(catalog, repo, domain, START + timedelta(days=1, hours=1), new_full)
    assert points.mark_damaged(catalog, first.id, "vda: checksum mismatch") == [first.id, second.id]
    ctx, _ = context(catalog, backend, tmp_path)
    now = START + timedelta(days=2)

    # keep_last 3 keeps three intact points: the damaged ones take no slot ...
    [plan] = plan_domain(catalog, domain, Retention(keep_last=3), now)
    assert plan.kept.kept == {full.id, new_full.id, newest.id} and plan.doomed == []
    # ... and stay visible while the rules would keep them, had they been intact.
    assert {r["id"]: r["action"] for r in plan.rows() if r["status"] == "damaged"} == {
        first.id: "keep", second.id: "keep"}

    # keep_last 2: the old chain's full goes although damaged points were built on it,
    # and the damaged points go with it: retention would have removed them by now.
    rules = DomainRules(domain, "p", Retention(keep_last=2), "test")
    report = prune_all(ctx, rules, now)
    assert set(report["deleted"]) == {full.id, first.id, second.id}
    assert_pruned(catalog, repo, domain, {new_full.id, newest.id})
    assert {p.id: p.status for p in points.for_domain(catalog, domain)}[first.id] == points.DELETED


retentions = (st.fixed_dictionaries({f"keep_{r}": st.integers(0, 3) for r in RULES})
              .filter(lambda d: any(d.values())).map(lambda d: Retention(**d)))
steps = st.lists(st.one_of(st.tuples(st.just("backup"), st.booleans(), st.integers(60, 20 * 86400)),
                           st.tuples(st.just("prune"), retentions, st.none() | st.integers(0, 12))),
                 min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(history=steps)
def test_random_backups_and_interrupted_prunes(catalog, tmp_path_factory, history):
    """Random backups (full or incremental, random gaps) and prunes (random rules, maybe
    cut short): after each, every listed point restores and the kept set is the rules'."""
    tmp = tmp_path_factory.mktemp("prop")
    backend = NfsBackend("nfs", NfsStorage(type="nfs", path=str(tmp / "repository"), create=True))
    repo = Repository(backend)
    domain = f"dom-{uuid.uuid4().hex[:8]}"
    now = START
    head: PointView | None = None
    for step in history:
        if step[0] == "backup":
            now += timedelta(seconds=step[2])
            head = add_point(catalog, repo, domain, now, None if step[1] or head is None else head)
            continue
        _, rules, cut = step
        listed = points.for_domain(catalog, domain, statuses=(points.COMPLETE,))
        want = select_kept(listed, rules, now).kept  # tests/test_retention.py proves this right
        ctx, _ = context(catalog, backend, tmp, cut)
        try:
            prune_all(ctx, DomainRules(domain, "p", rules, "test"), now)
        except PowerCut:
            assert_listed_points_restore(catalog, repo, domain)
            ctx, _ = context(catalog, backend, tmp)
            prune_all(ctx, DomainRules(domain, "p", rules, "test"), now)
        assert_pruned(catalog, repo, domain, set(want))
        # Idempotent: the same prune again deletes nothing.
        assert prune_all(ctx, DomainRules(domain, "p", rules, "test"), now)["deleted"] == []
        head = points.for_domain(catalog, domain, statuses=(points.COMPLETE,))[-1] if want else None


# --- a real guest, a real worker ---------------------------------------------------------------

POLICY = """\
apiVersion: virtwarden/v1
kind: Policy
metadata:
  name: keep-two
spec:
  selector:
    domains: ["{domain}"]
  backup:
    target: nfs
{retention}"""
RETENTION = "    retention:\n      keep_last: 2\n"


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_prune_keeps_what_the_policy_says_and_every_listed_point_restores(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    # No retention yet: backups prune their chain group themselves once it is set.
    (policy_dir / "keep.yaml").write_text(POLICY.format(domain=g.name, retention=""))
    vw.extra["policy_dir"] = str(policy_dir)
    vw.start_worker()
    ids, expected = [], {}
    for step, full in enumerate([True, False, True, False, False]):
        g.write("vda", step * MiB, MiB, pattern=0x60 + step)
        r = vw.cli("backup", g.name, *(["--full"] if full else []), "--wait", "--json")
        assert r.code == 0, r.err
        ids.append(r.json()["result"]["point_id"])
        expected[ids[-1]] = g.shadow_copy("vda", tmp_path / f"expected-{step}.raw")
    f1, i1, f2, i2, i3 = ids
    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["level"] for p in listed] == ["full", "incremental", "full", "incremental", "incremental"]
    repo_root = Path(vw.storage["nfs"]["path"])
    files = sorted(repo_root.rglob("*"))
    (policy_dir / "keep.yaml").write_text(POLICY.format(domain=g.name, retention=RETENTION))

    # The plan: keep_last 2 keeps i3 and i2, which need f2; the first chain goes.
    r = vw.cli("prune", g.name, "--dry-run", "--json")
    assert r.code == 0, r.err
    rows = {row["id"]: row for row in r.json()["domains"][0]["points"]}
    assert {i for i, row in rows.items() if row["action"] == "delete"} == {f1, i1}
    assert rows[f2]["reason"] == f"needed by {i2}" and rows[i3]["reason"].startswith("last")
    assert "policy 'keep-two' governs it" in vw.cli("prune", g.name, "--dry-run").out
    assert vw.cli("backups", g.name, "--json").json() == listed and sorted(repo_root.rglob("*")) == files

    # A prune that dies right after unpublishing i1 (its manifest gone, its image not yet).
    cfg = load(str(vw.write_config()))
    backend = open_backend("nfs", cfg.storage_target("nfs"))
    ctx, _ = context(vw.catalog(), backend, tmp_path, cut=1)
    with pytest.raises(PowerCut):
        prune_all(ctx, DomainRules(g.name, "keep-two", Retention(keep_last=2), "test"), datetime.now(UTC))
    status = {p["id"]: p["status"] for p in vw.cli("backups", g.name, "--json").json()}
    assert status == {f1: "complete", i1: "deleting", f2: "complete", i2: "complete", i3: "complete"}
    _restore_all(vw, g.name, expected, tmp_path / "after-crash")
    refused = vw.cli("restore", g.name, "--point", i1, "--to-dir", str(tmp_path / "no"), "--wait")
    assert refused.code != 0 and "deleting" in refused.err

    # The real prune, by the worker: finishes i1, deletes f1.
    r = vw.cli("prune", g.name, "--wait", "--json")
    assert r.code == 0, r.err
    job = r.json()
    assert job["state"] == "succeeded" and sorted(job["result"]["deleted"]) == sorted([i1, f1])
    status = {p["id"]: p["status"] for p in vw.cli("backups", g.name, "--json").json()}
    assert status == {f1: "deleted", i1: "deleted", f2: "complete", i2: "complete", i3: "complete"}
    for gone in (f1, i1):
        assert not [p for p in repo_root.rglob("*") if p.is_file() and gone in str(p)]
        with pytest.raises(ObjectNotFound):
            Repository(backend).read_manifest(next(p["manifest_key"] for p in _rows(vw, g.name) if p["id"] == gone))
    _restore_all(vw, g.name, expected, tmp_path / "after-prune")


def _rows(vw, domain: str) -> list[dict]:
    return [{"id": p.id, "manifest_key": p.manifest_key} for p in points.for_domain(vw.catalog(), domain)]


def _restore_all(vw, domain: str, expected: dict, where: Path) -> None:
    """Every point listed as complete restores and equals the guest's disk at that point."""
    listed = [p for p in vw.cli("backups", domain, "--json").json() if p["status"] == "complete"]
    assert listed
    for p in listed:
        out = where / p["id"]
        r = vw.cli("restore", domain, "--point", p["id"], "--to-dir", str(out), "--wait")
        assert r.code == 0, r.err
        assert images_equal(out / "vda.qcow2", expected[p["id"]]), p["id"]


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_each_backup_applies_its_policys_retention(vw, guest_factory, tmp_path):
    """After a successful backup its chain group is pruned: keep_last 2 with a full each
    time leaves the two newest points, and the older ones are deleted from storage."""
    g = guest_factory(disks=1, size_mib=16)
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "keep.yaml").write_text(POLICY.format(domain=g.name, retention=RETENTION))
    vw.extra["policy_dir"] = str(policy_dir)
    vw.start_worker()
    ids = []
    for step in range(3):
        g.write("vda", step * MiB, MiB, pattern=0x70 + step)
        r = vw.cli("backup", g.name, "--full", "--wait", "--json")
        assert r.code == 0, r.err
        ids.append(r.json()["result"]["point_id"])
    assert r.json()["result"]["retention"] == {"deleted": [ids[0]], "kept": 2}
    status = {p["id"]: p["status"] for p in vw.cli("backups", g.name, "--json").json()}
    assert status == {ids[0]: "deleted", ids[1]: "complete", ids[2]: "complete"}
    repo_root = Path(vw.storage["nfs"]["path"])
    assert not [p for p in repo_root.rglob("*") if p.is_file() and ids[0] in str(p)]
    out = tmp_path / "latest"
    assert vw.cli("restore", g.name, "--to-dir", str(out), "--wait").code == 0
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now.raw"))
