"""Format-2 repositories: which have chunks to collect, and what their last gc counted.

A format-2 point's chunks may be shared with other points, so deleting the point (a
prune) or failing it (a backup that did not finish) removes its manifest and indexes
only; its chunks stay stored until gc finds that no published point names them
(storage_backends/format2/repository.py). Whenever a format-2 point becomes ``deleted``
or ``failed``, the same transaction notes that its repository has garbage
(``note_garbage``: ``garbage_since`` keeps the first such change not yet collected,
``garbage_last`` the latest). Every worker's sweep asks ``due_for_gc`` which
repositories have some and no gc started within ``worker.gc_seconds``, and submits a gc
job for each (tasks/gc.py); the job records what it found (``gc_finished``), which clears
the mark unless points went after the gc began (gc may have listed their chunks as in
use: the mark stays, dated from the latest). A gc that deferred (a backup was writing)
or died leaves it as it is: the next one is due a period after this one started.
(``virtwarden storage gc`` works without a catalog and records nothing: the next
automatic gc finds nothing left and clears the mark.)

The counts (points, chunks, stored and logical bytes) are what the metrics export:
reading them from the repository at every scrape would mean reading every index.

A chunk a job found damaged but could not delete (``note_damaged_chunks``: a restore
or a verification whose credentials only read) stays in storage, which goes on saying
it is there: the next backup would name it without storing it. Every format-2 backup
of the storage reads ``damaged_chunks`` before it writes, stores those chunks again
whenever it produces their data, and removes their rows once they are
(``clear_damaged_chunks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.orm import Session
from virtwarden.catalog.clock import db_later, db_now
from virtwarden.catalog.models import DamagedChunk, RepositoryUsage
from virtwarden.catalog.store import Catalog, dialect_insert


class GcReport(Protocol):
    """What a gc found and did (storage_backends.format2.repository.GcReport)."""

    @property
    def chunks(self) -> int: ...
    @property
    def deleted(self) -> int: ...
    @property
    def deleted_bytes(self) -> int: ...
    @property
    def deferred(self) -> str | None: ...
    @property
    def points(self) -> int: ...
    @property
    def logical_bytes(self) -> int: ...
    @property
    def stored_bytes(self) -> int: ...


@dataclass(frozen=True)
class Usage:
    storage: str
    garbage_since: datetime | None
    gc_started_at: datetime | None
    gc_finished_at: datetime | None
    gc_deferred: str | None
    points: int | None
    chunks: int | None
    stored_bytes: int | None
    logical_bytes: int | None
    deleted_chunks: int
    deleted_bytes: int


def note_garbage(s: Session, storage: str) -> None:
    """In the caller's transaction: a point of format-2 ``storage`` went (deleted or
    failed), so chunks only it named may now be unused."""
    stmt = dialect_insert(s, RepositoryUsage).values(storage=storage, garbage_since=db_now(), garbage_last=db_now(),
                                                     deleted_chunks=0, deleted_bytes=0)
    s.execute(stmt.on_conflict_do_update(
        index_elements=["storage"],
        set_={"garbage_since": func.coalesce(RepositoryUsage.garbage_since, stmt.excluded.garbage_since),
              "garbage_last": stmt.excluded.garbage_last}))


def due_for_gc(cat: Catalog, every_seconds: float) -> list[str]:
    """The storage targets with garbage and no gc started in the last ``every_seconds``."""
    with cat.session() as s:
        q = (select(RepositoryUsage.storage)
             .where(RepositoryUsage.garbage_since.is_not(None))
             .where(or_(RepositoryUsage.gc_started_at.is_(None),
                        RepositoryUsage.gc_started_at < db_later(-every_seconds)))
             .order_by(RepositoryUsage.garbage_since))
        return list(s.scalars(q))


def gc_starting(cat: Catalog, storage: str) -> datetime:
    """Record that a gc of ``storage`` begins; the database's time it did, for
    ``gc_finished``."""
    with cat.session() as s:
        started = s.execute(select(db_now())).scalar_one()
        stmt = dialect_insert(s, RepositoryUsage).values(storage=storage, gc_started_at=started, deleted_chunks=0,
                                                         deleted_bytes=0)
        s.execute(stmt.on_conflict_do_update(index_elements=["storage"],
                                             set_={"gc_started_at": stmt.excluded.gc_started_at}))
        return started  # type: ignore[no-any-return]


def gc_finished(cat: Catalog, storage: str, started: datetime, report: GcReport) -> None:
    """Record a gc's outcome. One that ran (not deferred) clears the garbage noted before
    it started and replaces the counts."""
    values: dict = {"gc_finished_at": db_now(), "gc_deferred": report.deferred}
    if report.deferred is None:
        # Points went while it ran (or in the same tick of the database's clock as its start,
        # which cannot tell which came first): their chunks may remain.
        after = RepositoryUsage.garbage_last >= started
        values.update(
            garbage_since=case((after, RepositoryUsage.garbage_last), else_=None),
            garbage_last=case((after, RepositoryUsage.garbage_last), else_=None),
            points=report.points, chunks=report.chunks - report.deleted, stored_bytes=report.stored_bytes,
            logical_bytes=report.logical_bytes, deleted_chunks=RepositoryUsage.deleted_chunks + report.deleted,
            deleted_bytes=RepositoryUsage.deleted_bytes + report.deleted_bytes)
    with cat.session() as s:
        s.execute(update(RepositoryUsage).where(RepositoryUsage.storage == storage).values(**values))


def usage(cat: Catalog) -> list[Usage]:
    with cat.session() as s:
        rows = s.scalars(select(RepositoryUsage).order_by(RepositoryUsage.storage))
        return [Usage(r.storage, r.garbage_since, r.gc_started_at, r.gc_finished_at, r.gc_deferred, r.points,
                      r.chunks, r.stored_bytes, r.logical_bytes, r.deleted_chunks, r.deleted_bytes) for r in rows]


def note_damaged_chunks(cat: Catalog, storage: str, chunks: set[str], by: str) -> None:
    """``chunks`` of ``storage`` were found damaged and left in storage (``by`` could not
    delete them)."""
    if not chunks:
        return
    with cat.session() as s:
        s.execute(dialect_insert(s, DamagedChunk).values(
            [{"storage": storage, "chunk": c, "found_at": db_now(), "found_by": by[:500]} for c in sorted(chunks)]
        ).on_conflict_do_nothing())


def damaged_chunks(cat: Catalog, storage: str) -> frozenset[str]:
    """The ids of ``storage``'s chunks found damaged and still in storage."""
    with cat.session() as s:
        return frozenset(s.scalars(select(DamagedChunk.chunk).where(DamagedChunk.storage == storage)))


def damaged_chunk_counts(cat: Catalog) -> dict[str, int]:
    """Per storage, how many chunks found damaged wait for a backup to store them again."""
    with cat.session() as s:
        rows = s.execute(select(DamagedChunk.storage, func.count()).group_by(DamagedChunk.storage))
        return {storage: n for storage, n in rows}


def clear_damaged_chunks(cat: Catalog, storage: str, chunks: set[str]) -> None:
    """``chunks`` are no longer damaged in storage: stored again, intact and durably, or
    gone (a gc deleted them once no point named them: the next backup that produces
    their data finds them missing and stores them)."""
    if not chunks:
        return
    with cat.session() as s:
        s.execute(delete(DamagedChunk).where(DamagedChunk.storage == storage, DamagedChunk.chunk.in_(sorted(chunks))))
