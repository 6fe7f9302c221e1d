"""The policy document: the whole schema of PRODUCT.md, checked once when it is loaded.

A policy says which domains it governs (``selector``) and what to do for them: back them
up (``backup``), rotate snapshots (``snapshots``), prove the backups boot (``drill``),
re-read the stored backups (``verify``), move them off a sick host (``migration``) and
react to hypervisor events (``on``).
Everything is validated here, before any job runs, so a typo surfaces in
``virtwarden policy validate`` and not at 02:00 in a worker log. Models are frozen
and forbid unknown keys; the checks that span several fields are in ``problems``.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, model_validator
from virtwarden.policies.fields import (
    Count,
    Cron,
    DomainMetadata,
    Duration,
    Glob,
    LabelValue,
    Name,
    Percent,
    Positive,
    TimeZone,
    choice,
    non_empty,
)

from virtwarden.yamldoc import Document, Path

API_VERSION = "virtwarden/v1"
KIND = "Policy"

Strategy = Literal["bitmap", "blockcommit"]
# auto: freeze guest filesystems when qemu-guest-agent answers; always: fail the job
# rather than copy unfrozen disks; never: do not ask the agent.
Quiesce = Literal["auto", "always", "never"]
SnapshotType = Literal["internal", "external"]
DrillPoint = Literal["latest", "oldest"]
DrillNetwork = Literal["none", "isolated"]
MigrationAction = Literal["evacuate", "backup"]
Event = Literal["domain.defined", "domain.undefined", "domain.started", "domain.stopped", "domain.crashed",
                "domain.suspended", "domain.resumed", "domain.migrated"]
Run = Literal["backup", "snapshot", "drill"]
Job = Literal["backup", "snapshot", "drill", "verify", "migration"]

EVENTS: tuple[str, ...] = typing.get_args(Event)
JOBS: tuple[str, ...] = typing.get_args(Job)
# The spec section that configures each job.
JOB_SECTIONS = {"backup": "backup", "snapshot": "snapshots", "drill": "drill", "verify": "verify",
                "migration": "migration"}

StorageName = Annotated[str, Field(min_length=1, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: Name
    description: str | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict)


class Selector(_Strict):
    """Which domains a policy governs: every condition given must hold.

    ``metadata`` is matched against the children of the domain's
    ``<metadata>`` element in the virtwarden namespace (see policies.select).
    """

    domains: Annotated[tuple[Glob, ...], AfterValidator(non_empty("leave domains out to select every domain"))] \
        = ("*",)
    hosts: Annotated[tuple[Glob, ...] | None, AfterValidator(non_empty("leave hosts out to select every host"))] \
        = None
    metadata: DomainMetadata = Field(default_factory=dict)
    exclude: tuple[Glob, ...] = ()


class Retention(_Strict):
    """How many restore points (or snapshots) to keep, borg-style; absent means keep all.

    A point is kept when any rule keeps it: the newest ``keep_last``, and the newest
    point of each of the last ``keep_hourly`` hours, ``keep_daily`` days, and so on.
    """

    keep_last: Count = 0
    keep_hourly: Count = 0
    keep_daily: Count = 0
    keep_weekly: Count = 0
    keep_monthly: Count = 0
    keep_yearly: Count = 0

    @model_validator(mode="after")
    def _keeps_something(self) -> Retention:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("keeps nothing: set at least one of " + ", ".join(type(self).model_fields)
                             + " above 0 (or leave retention out to keep every point)")
        return self


class _Scheduled(_Strict):
    # Cron slots, read in ``timezone``; without a schedule the job runs only on events
    # (spec.on) and on demand.
    schedule: Cron | None = None
    timezone: TimeZone = "UTC"
    # When two policies select one domain for the same job, the higher priority governs.
    priority: StrictInt = 0
    # Scheduled jobs of this section queued or running at once: on one host (whatever
    # policy made them: a host's disks and network are what this protects), and of this
    # policy on all hosts. A slot over a limit waits (deferred) while its window is open.
    max_parallel_per_host: Positive | None = None
    max_parallel: Positive | None = None


class Backup(_Scheduled):
    target: StorageName
    strategy: Annotated[Strategy, choice(Strategy)] = "bitmap"
    # How long after a slot a missed backup may still start; None: until the next slot.
    window: Duration | None = None
    # Incrementals between two fulls; 0 makes every backup a full.
    full_every: Count = 7
    quiesce: Annotated[Quiesce, choice(Quiesce)] = "auto"
    retention: Retention | None = None


class Snapshots(_Scheduled):
    type: Annotated[SnapshotType, choice(SnapshotType)] = "internal"
    retention: Retention | None = None
    quiesce: Annotated[Quiesce, choice(Quiesce)] = "auto"


class Drill(_Scheduled):
    # latest: the newest restore point; oldest: the oldest kept one, which proves the
    # longest chain still restores.
    point: Annotated[DrillPoint, choice(DrillPoint)] = "latest"
    # How long the restored domain must stay up to pass, counted from the moment it
    # showed that it booted (the serial marker, the agent; else from the start).
    run_for: Duration = 60
    # How long to wait for that evidence (the serial marker, the agent) before failing.
    boot_timeout: Duration = 300
    # Text the guest prints on its serial console once it is up.
    serial_marker: Annotated[str, Field(min_length=1, strict=True)] | None = None
    expect_agent: StrictBool = False
    network: Annotated[DrillNetwork, choice(DrillNetwork)] = "none"
    # Storage to restore from; default: spec.backup.target.
    target: StorageName | None = None


class Verify(_Scheduled):
    """Re-read the stored restore points of the governed domains and check them against
    the catalog's checksums (tasks/verify.py); damaged points are taken out of service."""

    # How long after a slot a missed verification may still start; None: until the next slot.
    window: Duration | None = None
    # Re-read this percentage of the domain's stored artifacts per run (whole points,
    # those never or least recently verified first); 100: every complete point.
    sample_percent: Percent = 100
    # Storage to verify; default: every target that holds points of the domain.
    target: StorageName | None = None


class Alert(_Strict):
    alertname: Annotated[str, Field(min_length=1, strict=True)]
    labels: dict[str, LabelValue] = Field(default_factory=dict)


class Migration(_Strict):
    on_alerts: tuple[Alert, ...] = ()
    # The alert label that names the sick host (Prometheus' 'instance' by default).
    host_label: Annotated[str, Field(min_length=1, strict=True)] = "instance"
    action: Annotated[MigrationAction, choice(MigrationAction)] = "evacuate"
    max_parallel: Positive = 2
    timeout: Duration = 600
    # Hosts that may receive domains; None: any configured host with room.
    targets: Annotated[tuple[Glob, ...] | None,
                       AfterValidator(non_empty("leave targets out to allow every host"))] = None
    priority: StrictInt = 0


class Trigger(_Strict):
    event: Annotated[Event, choice(Event)]
    run: Annotated[Run, choice(Run)]
    full: StrictBool = False


class Spec(_Strict):
    selector: Selector = Field(default_factory=Selector)
    backup: Backup | None = None
    snapshots: Snapshots | None = None
    drill: Drill | None = None
    verify: Verify | None = None
    migration: Migration | None = None
    on: tuple[Trigger, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where a policy was written, to point every later message at the right line."""

    file: str
    line: int
    document: Document | None = None

    def line_of(self, path: Path = ()) -> int:
        return self.document.line_of(path) if self.document and path else self.line

    def at(self, path: Path = ()) -> str:
        return f"{self.file}:{self.line_of(path)}"


class Policy(_Strict):
    apiVersion: Literal["virtwarden/v1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: Spec
    _source: Source = PrivateAttr(default_factory=lambda: Source("<memory>", 1))

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def source(self) -> Source:
        return self._source

    @property
    def source_text(self) -> str:
        return self._source.at()

    def placed(self, source: Source) -> Policy:
        """This policy, remembering where it was read (the model itself stays frozen)."""
        self._source = source
        return self

    def section(self, job: Job) -> Backup | Snapshots | Drill | Verify | Migration | None:
        """The settings for ``job``, or None when this policy does not ask for it.

        Every backed-up domain can be drilled: without a drill section, a policy with a
        backup section answers for drills with the defaults and the backup's priority.
        """
        if job not in JOB_SECTIONS:
            raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
        found = getattr(self.spec, JOB_SECTIONS[job])
        if found is None and job == "drill" and self.spec.backup is not None:
            return Drill(priority=self.spec.backup.priority)
        return found

    def summary(self) -> dict[str, Any]:
        """Plain data for ``policy list --json`` (durations in seconds)."""
        return {"name": self.name, "description": self.metadata.description, "file": self._source.file,
                "line": self._source.line, "jobs": [j for j in JOBS if getattr(self.spec, JOB_SECTIONS[j])],
                "spec": self.spec.model_dump(mode="json", exclude_none=True)}


def problems(policy: Policy) -> list[tuple[Path, str]]:
    """Checks that span several fields, each with the path of the field to fix."""
    spec = policy.spec
    out: list[tuple[Path, str]] = []
    if not any(getattr(spec, s) for s in JOB_SECTIONS.values()):
        out.append((("spec",), "the policy asks for nothing: add a backup, snapshots, drill, verify or migration"
                    " section"))
    for name in ("backup", "verify"):
        section = getattr(spec, name)
        if section and section.window is not None and section.schedule is None:
            out.append((("spec", name, "window"), "a window needs a schedule: it counts from each scheduled slot"))
    if spec.snapshots and spec.snapshots.type == "internal" and spec.snapshots.quiesce == "always":
        out.append((("spec", "snapshots", "quiesce"), "libvirt quiesces only external (disk-only) snapshots:"
                    " use type: external, or quiesce: auto"))
    if spec.drill and not spec.backup and not spec.drill.target:
        out.append((("spec", "drill"), "a drill needs restore points to read: add spec.backup or set"
                    " spec.drill.target"))
    if spec.migration and spec.migration.action == "backup" and not spec.backup:
        out.append((("spec", "migration", "action"), "action 'backup' needs a spec.backup section"
                    " (where to store the backup)"))
    return out + _trigger_problems(spec)


def _trigger_problems(spec: Spec) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    needs = {"backup": (spec.backup, "a spec.backup section (where to store the backup)"),
             "snapshot": (spec.snapshots, "a spec.snapshots section (type and retention)"),
             "drill": (spec.backup or (spec.drill and spec.drill.target),
                       "a spec.backup section or spec.drill.target (where to restore from)")}
    seen: dict[tuple[str, str], int] = {}
    for i, trigger in enumerate(spec.on):
        present, what = needs[trigger.run]
        if not present:
            out.append((("spec", "on", i, "run"), f"run: {trigger.run} needs {what}"))
        if trigger.full and trigger.run != "backup":
            out.append((("spec", "on", i, "full"), f"full applies to run: backup only, not {trigger.run}"))
        key = (trigger.event, trigger.run)
        if key in seen:
            out.append((("spec", "on", i), f"repeats spec.on[{seen[key]}] ({trigger.event} -> {trigger.run}):"
                        " one event runs a job once"))
        seen.setdefault(key, i)
    return out
