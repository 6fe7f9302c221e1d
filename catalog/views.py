"""What the catalog's reads return: small frozen views of its rows, and the states and
statuses they are judged by. No SQLAlchemy here, so that a command that only reads
(catalog.reader: the CLI's listings) can have them without importing it; catalog.jobs,
catalog.points and catalog.alerts build the same views from their models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# A job's states (catalog.jobs).
QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)
# A restore point's statuses (catalog.points); a failed point is FAILED too.
WRITING, COMPLETE, DELETING, DELETED, DAMAGED = "writing", "complete", "deleting", "deleted", "damaged"
# A snapshot's states (catalog.snapshots): also DELETED.
CREATING, PRESENT, MISSING = "creating", "present", "missing"
# A drill's states (catalog.drills): RUNNING, PASSED or FAILED.
PASSED = "passed"
# What the scheduler decided about a slot (catalog.slots), and the reason of one not decided yet.
STARTED, SKIPPED, DEFERRED = "started", "skipped", "deferred"
NEW = "new: claimed, not decided yet"
# Seconds between a daemon's reports of itself (catalog.services); three missed: silent.
BEAT_SECONDS = 30.0


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    state: str
    domain: str | None
    host: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    progress: float
    progress_text: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    requested_by: str | None
    fence: int = 0
    sends: int = 0
    give_up: str | None = None
    lease_owner: str | None = None  # host:pid:thread of the attempt running it

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True)
class ArtifactView:
    target: str
    key: str
    size_bytes: int
    sha256: str
    virtual_size: int


@dataclass(frozen=True)
class PointView:
    id: str
    domain: str
    domain_uuid: str
    host: str
    storage: str
    strategy: str
    chain_id: str
    parent_id: str | None
    seq: int
    level: str
    status: str
    reason: str | None
    consistency: str
    checkpoint: str | None
    manifest_key: str
    size_bytes: int
    job_id: str | None
    created_at: datetime
    completed_at: datetime | None
    artifacts: tuple[ArtifactView, ...] = field(default=())
    manifest_sha256: str | None = None
    verified_at: datetime | None = None
    damage: str | None = None
    format: int = 1  # the repository format: 1 (a qcow2 per disk) or 2 (chunks)

    @property
    def usable(self) -> bool:
        return self.status == COMPLETE

    @property
    def note(self) -> str:
        """What a listing says about the point: what was found damaged, else its reason
        (why a full, why it failed)."""
        return self.damage or self.reason or ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "level": self.level,
            "chain_id": self.chain_id,
            "parent_id": self.parent_id,
            "size_bytes": self.size_bytes,
            "status": self.status,
            "storage": self.storage,
            "strategy": self.strategy,
            "consistency": self.consistency,
            "reason": self.reason,
            "damage": self.damage,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "manifest_sha256": self.manifest_sha256,
            "format": self.format,
            "disks": [
                {"target": a.target, "size_bytes": a.size_bytes, "sha256": a.sha256,
                 "virtual_size": a.virtual_size}
                for a in self.artifacts
            ],
        }


@dataclass(frozen=True)
class AlertView:
    id: int
    fingerprint: str
    name: str
    status: str
    labels: dict[str, Any]
    host: str | None
    action: str | None
    job_id: str | None
    starts_at: datetime
    received_at: datetime
    resolved_at: datetime | None
    outcome: str | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True)
class SnapshotView:
    id: int
    domain: str
    domain_uuid: str
    host: str
    name: str
    policy: str | None
    kind: str  # internal | external
    consistency: str  # crash | quiesced | system | offline ("" while creating)
    state: str
    job_id: str | None
    created_at: datetime
    deleted_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True)
class DrillView:
    id: str
    domain: str
    point_id: str | None
    host: str
    state: str
    throwaway: str | None
    checks: list[dict[str, Any]] = field(default_factory=list)
    restore_seconds: float | None = None
    boot_seconds: float | None = None
    error: str | None = None
    cleaned_up: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def passed(self) -> bool:
        return self.state == PASSED

    def to_json(self) -> dict[str, Any]:
        return {**_as_json(self), "job_id": self.id}


@dataclass(frozen=True)
class SlotRow:
    id: int
    policy: str
    job: str
    domain: str
    slot_at: datetime
    window_end: datetime
    state: str
    reason: str | None
    job_id: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True)
class ServiceView:
    kind: str
    node: str
    hosts: str
    pid: int
    version: str
    started_at: datetime
    seen_at: datetime
    backlog: int | None = None
    lag_seconds: float | None = None


def _as_json(view: Any) -> dict[str, Any]:
    """A view's fields as JSON-ready data: times in ISO 8601, the rest as they are."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v)
            for k in view.__dataclass_fields__ for v in (getattr(view, k),)}
