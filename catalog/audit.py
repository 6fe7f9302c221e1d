"""The audit log: who asked for what, when, with which parameters, and how it ended.

Runbook runs and API requests write here; a row is written when the action starts
(``started``, or ``dry-run`` / ``refused`` for ones that change nothing) and finished
with its outcome, so an action whose process died shows as still ``started``.
"""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from virtwarden.catalog.models import AuditRecord, utcnow
from virtwarden.catalog.store import Catalog

STARTED, SUCCEEDED, FAILED, DRY_RUN, REFUSED = "started", "succeeded", "failed", "dry-run", "refused"


@dataclass(frozen=True)
class AuditView:
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    params: dict
    job_id: str | None
    outcome: str
    detail: str | None
    finished_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


def _view(r: AuditRecord) -> AuditView:
    return AuditView(r.id, r.at, r.actor, r.action, r.target, dict(r.params or {}), r.job_id, r.outcome, r.detail,
                     r.finished_at)


def local_actor() -> str:
    """The person at this terminal: the sudo caller when there is one, at this machine."""
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def record(cat: Catalog, *, actor: str, action: str, target: str | None, params: dict, outcome: str = STARTED,
           job_id: str | None = None, detail: str | None = None) -> AuditView:
    with cat.session() as s:
        row = AuditRecord(at=utcnow(), actor=actor, action=action, target=target, params=params, job_id=job_id,
                          outcome=outcome, detail=detail,
                          finished_at=None if outcome == STARTED else utcnow())
        s.add(row)
        s.flush()
        return _view(row)


def finish(cat: Catalog, audit_id: int, outcome: str, detail: str | None = None, job_id: str | None = None) -> None:
    with cat.session() as s:
        row = s.get_one(AuditRecord, audit_id)
        row.outcome, row.detail, row.finished_at = outcome, detail, utcnow()
        if job_id is not None:
            row.job_id = job_id


def recent(cat: Catalog, *, action_prefix: str | None = None, limit: int = 50) -> list[AuditView]:
    with cat.session() as s:
        q = select(AuditRecord)
        if action_prefix:
            q = q.where(AuditRecord.action.startswith(action_prefix, autoescape=True))
        return [_view(r) for r in s.scalars(q.order_by(AuditRecord.id.desc()).limit(limit))]
