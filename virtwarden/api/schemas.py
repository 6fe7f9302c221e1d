"""The HTTP API's request and response bodies (they are also its OpenAPI schema).

Restore requests are strict: an unknown or misspelt field is an error, never ignored.
Alertmanager payloads are checked for what virtwarden uses and may carry more, since
Alertmanager adds fields over time and does not retry a 4xx.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator


class RestoreIn(BaseModel):
    """Exactly one destination: ``to_dir`` (flat images), ``as_domain`` (a new domain)
    or ``in_place``. The point is ``point`` (an id or "latest") or ``at`` (the last
    complete point at or before that time), not both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"domain": "web01", "point": "latest", "to_dir": "/srv/restore/web01"},
                     {"domain": "web01", "at": "2025-03-30T02:00:00Z", "as_domain": "web01-restored"}]})

    domain: str = Field(min_length=1, max_length=255, pattern=r"^[^\s/][^/]*$")
    point: str | None = Field(default=None, min_length=1, max_length=64,
                              description='a restore point id, or "latest" (the default)')
    at: AwareDatetime | None = Field(default=None, description="the last complete point at or before this time")
    to_dir: str | None = Field(default=None, min_length=1, max_length=4096,
                               description="a new or empty directory on the worker's host for vda.qcow2, ..., "
                                           "under restore.allowed_dirs (403 otherwise)")
    as_domain: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^\s/][^/]*$")
    in_place: bool = False
    discard_old: bool = Field(default=False, description="with in_place: delete the replaced disks afterwards")
    start: bool = Field(default=False, description="with as_domain or in_place: start the domain afterwards")
    host: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("to_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or posixpath.normpath(v) != v.rstrip("/") or "\0" in v):
            raise ValueError("must be an absolute, normalised path (no '..', no '//')")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> RestoreIn:
        modes = [m for m, on in (("to_dir", self.to_dir is not None), ("as_domain", self.as_domain is not None),
                                 ("in_place", self.in_place)) if on]
        if len(modes) != 1:
            raise ValueError(f"give exactly one of to_dir, as_domain, in_place (got {', '.join(modes) or 'none'})")
        if self.point is not None and self.at is not None:
            raise ValueError("give point or at, not both")
        if self.discard_old and not self.in_place:
            raise ValueError("discard_old only goes with in_place")
        if self.start and self.to_dir is not None:
            raise ValueError("start only goes with as_domain or in_place")
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the request as validated: the same request however it is spelt."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class JobAccepted(BaseModel):
    job_id: str
    state: str
    replayed: bool = Field(description="true when an earlier request with the same Idempotency-Key started the job")


class JobOut(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed"]
    domain: str | None
    host: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    progress: float
    progress_text: str | None
    attempts: int
    max_attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    requested_by: str | None


class DiskOut(BaseModel):
    target: str
    size_bytes: int
    sha256: str
    virtual_size: int


class PointOut(BaseModel):
    """One restore point, as ``virtwarden backups --json`` prints it."""

    id: str
    created_at: str
    completed_at: str | None
    level: Literal["full", "incremental"]
    chain_id: str
    parent_id: str | None
    size_bytes: int
    status: str
    storage: str
    strategy: str
    consistency: str
    reason: str | None
    # Status damaged: what a verification found (the point's own data, or the damaged
    # point it is built on).
    damage: str | None = None
    verified_at: str | None = None  # when a verification last read its data back intact
    manifest_sha256: str | None = None  # None: made before manifests were checksummed
    format: Literal[1, 2] = 1  # the repository format (docs/repository-format.md)
    disks: list[DiskOut]


class AlertOut(BaseModel):
    """One alert occurrence as received, and what became of it (``virtwarden alerts --json``)."""

    id: int
    fingerprint: str
    name: str
    status: Literal["firing", "resolved"]
    labels: dict[str, Any]
    host: str | None
    action: str | None  # evacuate | backup, when a policy maps the alert to one
    job_id: str | None
    starts_at: str
    received_at: str
    resolved_at: str | None
    # started, already-running, refused, unmatched, error or resolved (None: received
    # before outcomes were recorded)
    outcome: str | None
    detail: str | None


class AlertIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: AwareDatetime  # Alertmanager's own spelling
    endsAt: AwareDatetime | None = None
    generatorURL: str = ""
    fingerprint: str = Field(min_length=1, max_length=128)


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body (``version`` "4")."""

    model_config = ConfigDict(extra="allow")

    version: Literal["4"]
    groupKey: str
    truncatedAlerts: int = Field(default=0, ge=0)
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[AlertIn] = Field(min_length=1)


class Error(BaseModel):
    error: str
    fields: list[dict[str, str]] | None = None


class DomainOverview(BaseModel):
    """One domain as the dashboard's fleet page shows it (virtwarden/api/overview.py)."""

    domain: str
    host: str | None
    state: str | None  # as the listener or scheduler last saw it
    policy: str | None  # the policy that governs its backups, by name and host
    policy_error: str | None
    next_backup_at: str | None  # that policy's next scheduled slot
    last_good_backup_at: str | None
    last_good_backup_age_seconds: int | None
    points: int  # complete restore points
    stored_bytes: int  # what they stored
    last_backup_state: str | None  # of its newest backup job
    last_backup_error: str | None
    last_backup_at: str | None
    last_drill_state: str | None  # running, passed or failed
    last_drill_at: str | None
    last_drill_job: str | None


class DrillIn(BaseModel):
    """A restore drill of ``domain``: its point (an id, "latest" or "oldest"; by default
    the policy's choice) restored and booted as a throwaway domain, then removed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"domain": "web01"}]})

    domain: str = Field(min_length=1, max_length=255, pattern=r"^[^\s/][^/]*$")
    point: str | None = Field(default=None, min_length=1, max_length=64)


class DrillOut(BaseModel):
    """One drill and its checks (``virtwarden drills --json``)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    domain: str
    point_id: str | None
    host: str
    state: str
    checks: list[dict[str, Any]]
    restore_seconds: float | None
    boot_seconds: float | None
    error: str | None
    started_at: str
    finished_at: str | None


class PlanOut(BaseModel):
    """What a request would do (``?dry_run=true``): the job it would create; nothing was
    created."""

    kind: str
    domain: str | None
    host: str
    plan: dict[str, Any]


class RunbookIn(BaseModel):
    """A runbook run's parameters (``virtwarden runbook show NAME`` lists them)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"params": {"domain": "web01"}}]})

    params: dict[str, str] = Field(default_factory=dict)
