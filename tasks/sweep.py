"""Unlisting what no job will finish: points left ``writing`` by a job that ended.

A backup's own failure path and its next attempt's recovery clean up after it. What
neither reaches is a point whose job ended without either: the last attempt's worker
died (and the give-up recovery could not run, or died too), or its cleanup could not
reach the catalog. Such a point is never offered for a restore, but it pins its chain
against pruning and its pieces stay stored. Every worker's sweeper calls this now and
then (``worker.sweep_seconds``).

Catalog first (``writing -> failed``, guarded on the job having ended, so two sweepers
or a sweeper and a recovery never both act), then storage: the manifest first, then the
data. A crash in between leaves a failed point with leftovers, which prune removes after
a day, never a listed point with missing data.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.storage_backends.base import Backend
from virtwarden.storage_backends.repository import Repository
from virtwarden.tasks.recovery import remove_point_data

from virtwarden.errors import VirtwardenError

log = logging.getLogger(__name__)


def sweep_unfinished_points(cat: Catalog, storage: Callable[[str], Backend]) -> list[str]:
    """Fail and remove the stored pieces of every point whose job ended while it was
    being written; returns their ids."""
    swept = []
    for p in points.unfinished_of_ended_jobs(cat):
        if not points.fail_unfinished(cat, p.id, "its job ended before the point was complete (worker lost on "
                                                 "the last attempt); unlisted by the sweep"):
            continue
        swept.append(p.id)
        log.warning("domain %s: point %s of job %s was left unfinished; unlisted, removing its pieces",
                    p.domain, p.id, p.job_id)
        try:
            remove_point_data(Repository(storage(p.storage)), p.manifest_key.rsplit("/", 1)[0] + "/")
        except VirtwardenError as e:  # prune removes a failed point's leftovers later
            log.warning("domain %s: point %s: its pieces stay for now: %s", p.domain, p.id, e)
    return swept
