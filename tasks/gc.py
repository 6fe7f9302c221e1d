"""The gc job: collect the chunks no point of a format-2 repository names any more.

Deleting a format-2 point (retention, ``prune``) or failing one leaves its chunks stored,
since other points may share them; the catalog notes that the repository has garbage
(catalog/repositories.py) and a worker's sweep submits this job for it, at most once per
``worker.gc_seconds`` per storage target (worker/outbox.py). The job runs the
repository's own gc (storage_backends/format2/repository.py): it deletes nothing while a
backup writes (then it says so and the next one is due a period later), and a gc killed
midway has deleted only unused chunks. What it found is recorded for the metrics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from virtwarden.catalog import repositories
from virtwarden.tasks.context import JobContext

from virtwarden.errors import JobFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcRequest:
    storage: str


def run_gc(ctx: JobContext, req: GcRequest) -> dict[str, Any]:
    repo = ctx.repository(req.storage)
    if repo is None:
        raise JobFailed(f"storage {req.storage!r} is not a format-2 target: its points keep no shared chunks")
    ctx.report(0.0, f"collecting unused chunks of {req.storage}")
    started = repositories.gc_starting(ctx.catalog, req.storage)
    report = repo.gc()
    repositories.gc_finished(ctx.catalog, req.storage, started, report)
    if report.deferred:
        log.info("job %s: gc of storage %s deleted nothing: %s; the next one is due later", ctx.job_id, req.storage,
                 report.deferred)
    else:
        log.info("job %s: gc of storage %s deleted %d unused chunk(s) (%d bytes); %d point(s) use %d", ctx.job_id,
                 req.storage, report.deleted, report.deleted_bytes, report.points, report.referenced)
        # Damaged chunks no job could delete (catalog.repositories) that are gone now,
        # deleted by this gc once no point named them: nothing is left to store again.
        gone = {cid for cid in repositories.damaged_chunks(ctx.catalog, req.storage)
                if not repo.backend.exists(repo.chunks.key(cid))}
        repositories.clear_damaged_chunks(ctx.catalog, req.storage, gone)
    ctx.report(1.0, "done")
    return {"storage": req.storage, "chunks": report.chunks, "referenced": report.referenced,
            "deleted": report.deleted, "deleted_bytes": report.deleted_bytes, "deferred": report.deferred,
            "points": report.points, "stored_bytes": report.stored_bytes, "logical_bytes": report.logical_bytes}
