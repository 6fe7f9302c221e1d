"""Unused chunks are collected without anyone asking: a format-2 point that goes
(deleted by retention or failed) marks its repository for gc in the same transaction;
the sweep submits one gc job per repository and period; a gc clears only what it could
have collected. Catalog level on SQLite and PostgreSQL (the end-to-end run, with a real
worker and storage, is in test_format2_backups)."""
from __future__ import annotations

import os
import time
import uuid

from virtwarden.catalog import jobs, points, repositories
from virtwarden.storage_backends.format2.repository import GcReport


def _point(cat, storage="vault", fmt=2):
    job = jobs.create(cat, kind="backup", domain="web01", host="h", params={})
    return points.begin(cat, id=str(uuid.uuid4()), domain="web01", domain_uuid="u1", host="h", storage=storage,
                        strategy="bitmap", chain_id=str(uuid.uuid4()), parent_id=None, seq=0, level="full",
                        reason="first", checkpoint=None, manifest_key="k/manifest", job_id=job.id, format=fmt)


def _deleted(cat, p):
    points.complete(cat, p.id, [], consistency="crash")
    assert points.transition(cat, p.id, (points.COMPLETE,), points.DELETING)
    assert p.storage not in repositories.due_for_gc(cat, 3600), "nothing is unused before the data went"
    assert points.transition(cat, p.id, (points.DELETING,), points.DELETED)


def _ran(deleted=3):
    return GcReport(chunks=10, referenced=7, deleted=deleted, deleted_bytes=deleted * 100, deferred=None, points=2,
                    logical_bytes=5000, stored_bytes=700)


def test_a_format2_point_that_goes_marks_its_repository_until_a_gc_that_began_after_it(cat):
    _deleted(cat, _point(cat))
    assert points.fail(cat, _point(cat, storage="other").id, "a failed backup leaves chunks too")
    assert points.fail(cat, _point(cat, storage="old", fmt=1).id, "format 1 shares nothing")
    assert sorted(repositories.due_for_gc(cat, 3600)) == ["other", "vault"]

    started = repositories.gc_starting(cat, "vault")
    assert repositories.due_for_gc(cat, 3600) == ["other"], "one gc per period"
    time.sleep(0.01)  # the database's clock has millisecond ticks: the next steps come after the start's
    assert sorted(repositories.due_for_gc(cat, 0.001)) == ["other", "vault"]
    late = _point(cat)
    _deleted(cat, late)  # while gc runs: it may have listed this point's chunks as used
    repositories.gc_finished(cat, "vault", started, _ran())
    (vault,) = [u for u in repositories.usage(cat) if u.storage == "vault"]
    assert vault.garbage_since is not None, "a point that went during the gc is still to collect"
    assert (vault.points, vault.chunks, vault.stored_bytes, vault.logical_bytes) == (2, 7, 700, 5000)
    assert (vault.deleted_chunks, vault.deleted_bytes) == (3, 300)

    time.sleep(0.01)  # this gc starts after the late point went, not in the same tick
    again = repositories.gc_starting(cat, "vault")
    repositories.gc_finished(cat, "vault", again, _ran(deleted=1))
    (vault,) = [u for u in repositories.usage(cat) if u.storage == "vault"]
    assert vault.garbage_since is None and vault.gc_deferred is None
    assert (vault.deleted_chunks, vault.deleted_bytes) == (4, 400), "running totals"
    assert repositories.due_for_gc(cat, 0.001) == ["other"]
    assert "old" not in {u.storage for u in repositories.usage(cat)}


def test_a_point_gone_in_the_tick_a_gc_started_keeps_its_repository_marked(cat):
    """The database's clock cannot order a point that went in the very tick a gc began
    (SQLite's clock has millisecond ticks): the gc may have listed its chunks as used, so
    the repository stays marked for the next gc."""
    from sqlalchemy import update
    from virtwarden.catalog.models import RepositoryUsage

    _deleted(cat, _point(cat))
    started = repositories.gc_starting(cat, "vault")
    with cat.session() as s:  # the point's deletion noted at the gc's own start time
        s.execute(update(RepositoryUsage).where(RepositoryUsage.storage == "vault").values(garbage_last=started))
    repositories.gc_finished(cat, "vault", started, _ran())
    (vault,) = [u for u in repositories.usage(cat) if u.storage == "vault"]
    assert vault.garbage_since is not None


def test_a_gc_that_deferred_changes_nothing_but_its_times(cat):
    _deleted(cat, _point(cat))
    started = repositories.gc_starting(cat, "vault")
    repositories.gc_finished(cat, "vault", started, GcReport(0, 0, 0, 0, "1 backup(s) under way: backup of web01"))
    (vault,) = repositories.usage(cat)
    assert vault.garbage_since is not None and vault.gc_deferred.startswith("1 backup")
    assert vault.points is None and vault.deleted_chunks == 0
    assert repositories.due_for_gc(cat, 3600) == [], "due again a period after it started"
    assert repositories.due_for_gc(cat, 0.001) == ["vault"]


def test_the_sweep_submits_one_gc_job_per_repository_and_never_piles_them_up(cat, tmp_path):
    """A repository with unused chunks gets a gc job from the sweep; a gc job that still
    waits for a worker (from an earlier period, its worker down) keeps the sweep from
    adding another; once it ended, the next sweep submits again. The broker is away
    here: the job is created all the same, for the outbox to send."""
    from virtwarden.worker.outbox import Sweeper

    from virtwarden import config as config_module

    (tmp_path / "virtwarden.yaml").write_text(
        f"data_dir: {tmp_path}\nbroker_url: redis://127.0.0.1:9/0\nhosts: {{h: {{uri: 'test:///default'}}}}\n"
        f"storage: {{vault: {{type: nfs, path: {tmp_path / 'vault'}, format: 2, key_file: {tmp_path / 'k'}}},"
        f" old: {{type: nfs, path: {tmp_path / 'old'}}}}}\n")
    cfg = config_module.load(str(tmp_path / "virtwarden.yaml"), env={})
    waiting = jobs.create(cat, kind="gc", domain=None, host="h", params={"storage": "vault"}, dedup_key="gc:vault:1")
    _deleted(cat, _point(cat))

    def gc_jobs():
        return [j for j in jobs.recent(cat, limit=100) if j.kind == "gc"]

    report = Sweeper(cfg, cat, lambda _job: None).sweep()
    assert report.collecting == [] and [j.id for j in gc_jobs()] == [waiting.id], "no second job beside one waiting"
    jobs.fail_queued(cat, waiting.id, "its worker never came")
    report = Sweeper(cfg, cat, lambda _job: None).sweep()
    assert report.collecting == ["vault"]
    fresh = [j for j in gc_jobs() if j.id != waiting.id]
    assert [(j.state, j.params, j.requested_by) for j in fresh] == [("queued", {"storage": "vault"}, "sweep")]
    report = Sweeper(cfg, cat, lambda _job: None).sweep()
    assert report.collecting == [] and len(gc_jobs()) == 2, "one per period"


def test_damaged_chunks_are_noted_once_per_storage_listed_counted_and_cleared(cat):
    repositories.note_damaged_chunks(cat, "vault", {"aa", "bb"}, "restore job 1")
    repositories.note_damaged_chunks(cat, "vault", {"bb", "cc"}, "verify job 2")  # bb again: still one row
    repositories.note_damaged_chunks(cat, "other", {"aa"}, "verify job 3")
    repositories.note_damaged_chunks(cat, "other", set(), "nothing")
    assert repositories.damaged_chunks(cat, "vault") == {"aa", "bb", "cc"}
    assert repositories.damaged_chunk_counts(cat) == {"vault": 3, "other": 1}
    repositories.clear_damaged_chunks(cat, "vault", {"aa", "zz"})
    assert repositories.damaged_chunks(cat, "vault") == {"bb", "cc"}
    assert repositories.damaged_chunks(cat, "other") == {"aa"}


def test_a_gc_forgets_the_damaged_chunks_it_deleted_and_keeps_the_others(cat, tmp_path):
    """A damaged chunk no job could delete, which no point names any more: the gc job
    deletes it, and with it goes its row (nothing is left to store again). One a point
    still names stays noted, and stored."""
    from virtwarden.storage_backends.format2.keys import RepositoryKey
    from virtwarden.storage_backends.format2.objects import Codec
    from virtwarden.storage_backends.format2.repository import Format2Repository
    from virtwarden.storage_backends.format2.store import write_disk
    from virtwarden.storage_backends.nfs import NfsBackend
    from virtwarden.tasks.gc import GcRequest, run_gc

    from virtwarden.config import NfsStorage

    repo = Format2Repository.init(NfsBackend("vault", NfsStorage(type="nfs", path=str(tmp_path / "repo"), create=True)),
                                  Codec(RepositoryKey.generate()), chunk_size=4096)
    refs, ids = [], []
    for n in range(2):
        index, _ = write_disk(repo.chunks, "vda", lambda _offset, length: os.urandom(length), 4096, 4096)
        ref = repo.ref("web01", f"p{n}")
        sha = repo.write_index(ref, index)
        repo.write_manifest(ref, {"format": 2, "domain": {"name": "web01"},
                                  "disks": [{"target": "vda", "index_sha256": sha}]})
        refs.append(ref)
        ids.append(index.chunks[0])
    repositories.note_damaged_chunks(cat, "vault", set(ids), "restore job 1")
    repo.delete_point(refs[0])

    class Job:  # what run_gc uses of a JobContext
        catalog, job_id = cat, "gc-1"

        @staticmethod
        def repository(_storage):
            return repo

        @staticmethod
        def report(_share, _text):
            pass

    result = run_gc(Job(), GcRequest("vault"))  # type: ignore[arg-type]
    assert result["deleted"] == 1
    assert repositories.damaged_chunks(cat, "vault") == {ids[1]}
    assert repo.backend.exists(repo.chunks.key(ids[1]))
