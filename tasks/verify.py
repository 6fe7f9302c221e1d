"""Verify the repository: re-read every stored artifact of the complete restore points
and check it against the SHA-256 the catalog recorded, and each manifest against the
catalog. Nothing is changed; what is wrong is listed (point, key, what) and fails the
job, so a scheduled or runbook-started verification pages someone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from catalog import points
from catalog.points import PointView
from storage_backends.repository import Repository
from tasks.context import JobContext
from virtwarden.errors import ChecksumMismatch, StorageError, VirtwardenError

log = logging.getLogger(__name__)
SHOWN = 10  # problems named in the error line; the log has all of them


@dataclass(frozen=True)
class VerifyRequest:
    domain: str | None = None  # None: every domain with points
    storage: str | None = None  # None: every storage target


def run_verify(ctx: JobContext, req: VerifyRequest) -> dict:
    domains = [req.domain] if req.domain else points.domains_with_points(ctx.catalog, (points.COMPLETE,))
    todo: list[PointView] = [p for d in domains
                             for p in points.for_domain(ctx.catalog, d, storage=req.storage,
                                                        statuses=(points.COMPLETE,))]
    total = sum(a.size_bytes for p in todo for a in p.artifacts) or 1
    done, problems, artifacts = 0, [], 0
    repos: dict[str, Repository] = {}
    for p in todo:
        repo = repos.get(p.storage) or repos.setdefault(p.storage, Repository(ctx.storage(p.storage)))
        try:
            _check_manifest(repo, p)
        except VirtwardenError as e:
            problems.append({"point": p.id, "domain": p.domain, "key": p.manifest_key, "problem": str(e)})
        for a in p.artifacts:
            base = done

            def moved(n: int, base: int = base) -> None:
                ctx.report(min(0.99, (base + n) / total), f"verifying {p.domain} {a.target}: {(base + n) >> 20} MiB")

            try:
                repo.backend.verify(a.key, a.sha256, progress=moved)
            except (ChecksumMismatch, StorageError) as e:
                problems.append({"point": p.id, "domain": p.domain, "key": a.key, "problem": str(e)})
            done += a.size_bytes
            artifacts += 1
    result = {"points": len(todo), "artifacts": artifacts, "bytes_read": done, "problems": problems,
              "summary": f"{len(todo)} point(s), {artifacts} artifact(s), {done} bytes re-read:"
                         f" {'all intact' if not problems else f'{len(problems)} problem(s)'}"}
    if problems:
        for item in problems:
            log.error("verify: point %s (%s) %s: %s", item["point"], item["domain"], item["key"], item["problem"])
        shown = "; ".join(f"{i['point']} {i['key']}: {i['problem']}" for i in problems[:SHOWN])
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise ChecksumMismatch(f"repository verification found {len(problems)} problem(s) in"
                               f" {len(todo)} point(s): {shown}{more}")
    ctx.report(1.0, "done")
    return result


def _check_manifest(repo: Repository, p: PointView) -> None:
    manifest = repo.read_manifest(p.manifest_key)
    want = {a.key: a.sha256 for a in p.artifacts}
    have = {d["key"]: d["sha256"] for d in manifest.get("disks", [])}
    if manifest.get("point_id") != p.id or want != have:
        raise ChecksumMismatch(f"manifest {p.manifest_key} does not match the catalog")
