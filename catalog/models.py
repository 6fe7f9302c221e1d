"""The catalog's tables (SQLAlchemy 2 typed ORM).

The catalog records what happened and what can be restored. The storage target stays
the source of truth for restorability (a restore point exists there only once its
manifest is written); a catalog row is ``complete`` only after that manifest is stored.
Schema changes go through Alembic (catalog/migrations); never edit a released migration.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog")
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Host(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    uri: Mapped[str] = mapped_column(String(512))
    group: Mapped[str] = mapped_column(String(128), default="default")
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # up | down (could not be reached when last asked); capacity as libvirt last said it
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    last_error: Mapped[str | None] = mapped_column(Text)
    capacity: Mapped[dict | None] = mapped_column(JSON)


class Domain(Base):
    """A libvirt domain as last seen; identity is its UUID (names can be reused)."""

    __tablename__ = "domains"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    host: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str | None] = mapped_column(String(32))
    first_seen_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Job(Base):
    """One unit of work. The row, not the broker message, is the truth about a job:
    a worker owns a running job only while its lease is fresh."""

    __tablename__ = "jobs"
    # (kind, state): what every metrics scrape counts, read from the index alone.
    __table_args__ = (Index("ix_jobs_kind_state", "kind", "state"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed
    domain: Mapped[str | None] = mapped_column(String(255), index=True)
    host: Mapped[str | None] = mapped_column(String(128))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_text: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    # The fencing token: raised by every claim, never lowered. Each attempt holds the
    # value its claim set, and every catalog change it makes is conditional on it, so a
    # worker that lost the job (paused, cut off) can change nothing once another took it.
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The outbox: while the job is queued, the database time by which a message for it
    # should have reached a worker. Past it, the message may be lost (a broker restarted,
    # a send that failed) and a sweeper sends it again (``sends`` counts the sends).
    dispatch_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when the job gave up: the error it ends with once its recovery has run.
    give_up: Mapped[str | None] = mapped_column(Text)
    # A unique key for jobs that must not be created twice (a schedule slot, a webhook).
    dedup_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    requested_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)  # newest first
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class DomainLock(Base):
    """At most one disk-changing job per domain, across every worker and host."""

    __tablename__ = "domain_locks"
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RestorePoint(Base):
    __tablename__ = "restore_points"
    # (status, domain, created_at): each domain's newest complete point, which every
    # metrics scrape reads, from the index alone; (status, storage, format, size_bytes):
    # what each storage target holds, the same way.
    __table_args__ = (Index("ix_restore_points_status_domain_created_at", "status", "domain", "created_at"),
                      Index("ix_restore_points_status_storage_size", "status", "storage", "format", "size_bytes"))
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), index=True)
    domain_uuid: Mapped[str] = mapped_column(String(36), index=True)
    host: Mapped[str] = mapped_column(String(128))
    storage: Mapped[str] = mapped_column(String(128))
    strategy: Mapped[str] = mapped_column(String(32))
    chain_id: Mapped[str] = mapped_column(String(36), index=True)
    parent_id: Mapped[str | None] = mapped_column(String(36))
    seq: Mapped[int] = mapped_column(Integer)  # 0 for the full, then 1, 2, ...
    level: Mapped[str] = mapped_column(String(16))  # full|incremental
    # writing -> complete (manifest stored) | failed; complete -> deleting -> deleted
    # (pruned); complete -> damaged (a verification found its data changed or missing)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)  # why a full, or why it failed
    consistency: Mapped[str] = mapped_column(String(16), default="crash")  # crash|quiesced
    checkpoint: Mapped[str | None] = mapped_column(String(255))
    manifest_key: Mapped[str] = mapped_column(String(1024))
    # The repository format the point is stored in (docs/repository-format.md): 1 or 2.
    format: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # SHA-256 of the manifest as stored: checked before a manifest is trusted.
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    # When a verification last re-read the point's data.
    verified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # What a verification found wrong (status damaged): the point's own data, or the
    # damaged point it is built on.
    damage: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="point", cascade="all, delete-orphan", order_by="Artifact.target"
    )


class Artifact(Base):
    """One stored disk image of a restore point."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    point_id: Mapped[str] = mapped_column(ForeignKey("restore_points.id", ondelete="CASCADE"), index=True)
    target: Mapped[str] = mapped_column(String(32))  # vda, vdb, ...
    key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    point: Mapped[RestorePoint] = relationship(back_populates="artifacts")


class Event(Base):
    """What a hypervisor said (lifecycle, block job, job completed)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(128))
    domain: Mapped[str | None] = mapped_column(String(255), index=True)
    domain_uuid: Mapped[str | None] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)


class ScheduleSlot(Base):
    """One scheduled slot of one policy's job for one domain. The unique constraint is
    what lets two schedulers run at once: only one can insert a slot."""

    __tablename__ = "schedule_slots"
    # (state, job_id): each tick looks for deferred slots and for started ones without a job.
    __table_args__ = (UniqueConstraint("policy", "job", "domain", "slot_at", name="uq_schedule_slot"),
                      Index("ix_schedule_slots_state_job_id", "state", "job_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    policy: Mapped[str] = mapped_column(String(128))
    job: Mapped[str] = mapped_column(String(32))  # backup | snapshot | drill | verify
    domain: Mapped[str] = mapped_column(String(255))
    slot_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    window_end: Mapped[datetime] = mapped_column(UtcDateTime)
    state: Mapped[str] = mapped_column(String(16))  # started | skipped | deferred
    reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Snapshot(Base):
    """A libvirt snapshot we created; rotation deletes only snapshots recorded here."""

    __tablename__ = "snapshots"
    __table_args__ = (Index("ix_snapshots_state_deleted_at", "state", "deleted_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    domain: Mapped[str] = mapped_column(String(255), index=True)
    domain_uuid: Mapped[str] = mapped_column(String(36))
    host: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    policy: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # internal | external
    consistency: Mapped[str] = mapped_column(String(16), default="crash")
    # creating | present | deleted | missing (see catalog.snapshots)
    state: Mapped[str] = mapped_column(String(16), default="present")
    job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Overlay(Base):
    """Journal of external overlays a blockcommit backup created, so a crash between
    snapshot and commit can be finished or undone later."""

    __tablename__ = "overlays"
    __table_args__ = (Index("ix_overlays_state_created_at", "state", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    domain: Mapped[str] = mapped_column(String(255), index=True)
    target: Mapped[str] = mapped_column(String(32))
    overlay_path: Mapped[str] = mapped_column(String(1024))
    base_path: Mapped[str] = mapped_column(String(1024))
    state: Mapped[str] = mapped_column(String(16))  # created | committed | abandoned
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Drill(Base):
    """One restore drill: a point restored into scratch space and booted as a throwaway
    domain. ``checks`` holds each check's name, outcome and detail."""

    __tablename__ = "drills"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the drill job's id
    domain: Mapped[str] = mapped_column(String(255), index=True)
    point_id: Mapped[str | None] = mapped_column(String(36))
    host: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))  # running | passed | failed
    throwaway: Mapped[str | None] = mapped_column(String(255))  # the drill domain's name
    checks: Mapped[list] = mapped_column(JSON, default=list)
    restore_seconds: Mapped[float | None] = mapped_column(Float)
    boot_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    cleaned_up: Mapped[bool] = mapped_column(default=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AuditRecord(Base):
    """Who asked for what, when, with which parameters, and how it ended (runbooks,
    API calls, on-call actions)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(128))
    target: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # started | succeeded | failed | dry-run | refused
    detail: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Alert(Base):
    """An Alertmanager alert as received; one row per (fingerprint, startsAt)."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("fingerprint", "starts_at", name="uq_alert_occurrence"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))  # firing | resolved
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    host: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str | None] = mapped_column(String(32))  # evacuate | backup | none
    job_id: Mapped[str | None] = mapped_column(String(36))
    starts_at: Mapped[datetime] = mapped_column(UtcDateTime)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)  # pruned by it
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # What became of it (virtwarden/alerts.py): started, already-running, refused,
    # unmatched, error or resolved, and why; the latest delivery's word, repeats aside.
    outcome: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


class Migration(Base):
    """One live migration of a domain between hosts."""

    __tablename__ = "migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    domain: Mapped[str] = mapped_column(String(255), index=True)
    domain_uuid: Mapped[str | None] = mapped_column(String(36))
    from_host: Mapped[str] = mapped_column(String(128))
    to_host: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(16))  # planned | running | succeeded | failed | skipped
    reason: Mapped[str | None] = mapped_column(Text)
    downtime_ms: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ApiNonce(Base):
    """A request signature the API accepted. Kept until its timestamp leaves the
    tolerance window, so a replay within the window is refused by every API process."""

    __tablename__ = "api_nonces"
    signature: Mapped[str] = mapped_column(String(128), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class ApiIdempotencyKey(Base):
    """An ``Idempotency-Key`` the API honoured: the request it came with (as a hash of
    its validated body) and the job it started. The same key with another body is refused."""

    __tablename__ = "api_idempotency_keys"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(36))
    actor: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)  # pruned by it


class SlotTotal(Base):
    """Running count of scheduled slots that were skipped, by job kind and cause: counted
    in the transaction that skips each slot (``catalog.slots.move``), so it only grows and
    stays true when old slot rows are removed. Causes: ``missed`` (no scheduler ran
    while its window was open), ``waited`` (a limit held it until its window closed),
    ``failed`` (its job could not be created)."""

    __tablename__ = "slot_totals"
    job: Mapped[str] = mapped_column(String(32), primary_key=True)
    cause: Mapped[str] = mapped_column(String(16), primary_key=True)
    slots: Mapped[int] = mapped_column(BigInteger, default=0)


class JobTotal(Base):
    """Running totals of finished jobs, for the metrics: counted in the transaction that
    records each job's end (catalog.jobs), so they only grow, cost one small read per
    scrape however long the job history is, and stay true when old job rows are removed.
    One row per kind, outcome and duration bucket (``le``: the bucket's upper bound in
    seconds, ``+Inf`` for the last); the jobs in that bucket, their seconds and the bytes
    their results reported (a backup's ``size_bytes``)."""

    __tablename__ = "job_totals"
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)  # succeeded | failed
    le: Mapped[str] = mapped_column(String(16), primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class RepositoryUsage(Base):
    """A format-2 storage target's repository (catalog.repositories): whether restore
    points left it since its last gc (a deleted or failed point's chunks stay stored
    until gc removes them; ``garbage_since``: the first such change not yet collected),
    and what that gc counted. One row per storage target, made by the first change."""

    __tablename__ = "repository_usage"
    storage: Mapped[str] = mapped_column(String(128), primary_key=True)
    garbage_since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    garbage_last: Mapped[datetime | None] = mapped_column(UtcDateTime)  # the latest such change
    gc_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    gc_finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    gc_deferred: Mapped[str | None] = mapped_column(Text)  # why the last gc deleted nothing
    # As the last gc that ran found them (after its deletions):
    points: Mapped[int | None] = mapped_column(Integer)
    chunks: Mapped[int | None] = mapped_column(BigInteger)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    logical_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Running totals over every gc, for the metrics.
    deleted_chunks: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class DamagedChunk(Base):
    """A format-2 chunk a job found damaged in storage and could not delete (credentials
    that only read, say): storage goes on saying it is there, so a backup would name it
    without storing it again. Every format-2 backup of the storage stores the chunks
    listed here again whenever it produces their data, whatever storage says, and then
    removes their rows (catalog.repositories)."""

    __tablename__ = "damaged_chunks"
    storage: Mapped[str] = mapped_column(String(128), primary_key=True)
    chunk: Mapped[str] = mapped_column(String(64), primary_key=True)  # its id (hex)
    found_at: Mapped[datetime] = mapped_column(UtcDateTime)
    found_by: Mapped[str] = mapped_column(Text)  # e.g. "restore job <id>"


class Service(Base):
    """A running worker, scheduler or listener, as it last said so (catalog.services): one
    row per kind, machine and hosts served, so a process restarted in the same place
    takes over its row. A clean stop removes the row; a process that dies leaves it, and
    its ``seen_at`` (the database's clock) stops moving."""

    __tablename__ = "services"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # worker | scheduler | listener
    node: Mapped[str] = mapped_column(String(255))  # the machine's host name
    hosts: Mapped[str] = mapped_column(String(1024), default="")  # the hypervisors it serves, comma-separated
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    # A listener's, as of its last report: events not handled yet, and how long
    # the oldest one not handled yet has waited (None for other kinds).
    backlog: Mapped[int | None] = mapped_column(Integer)
    lag_seconds: Mapped[float | None] = mapped_column(Float)
