"""Policies: YAML documents that say which domains get which jobs, and how.

Pure by design: parsing, validation and selection over plain data, with no libvirt,
Celery, storage or database code, so the CLI, the scheduler and the tests can use it
anywhere. See ``policies/examples/nightly.yaml`` for a commented example.
"""
from __future__ import annotations

from virtwarden.policies.fields import format_duration, parse_duration
from virtwarden.policies.loader import load_dir, load_file, validate_paths
from virtwarden.policies.model import (
    API_VERSION,
    EVENTS,
    JOBS,
    KIND,
    Alert,
    Backup,
    Drill,
    Migration,
    Policy,
    Retention,
    Selector,
    Snapshots,
    Source,
    Spec,
    Trigger,
    Verify,
)
from virtwarden.policies.resolve import (
    BackupSettings,
    SnapshotSettings,
    check_against_config,
    load_policies,
    resolve_backup,
    resolve_snapshots,
)
from virtwarden.policies.select import METADATA_NAMESPACE, DomainFacts, governing, matching, parse_metadata, selects

__all__ = [
    "API_VERSION", "EVENTS", "JOBS", "KIND", "METADATA_NAMESPACE",
    "Alert", "Backup", "BackupSettings", "DomainFacts", "Drill", "Migration", "Policy", "Retention",
    "Selector", "Snapshots", "Source", "Spec", "Trigger", "Verify",
    "check_against_config", "format_duration", "governing", "load_dir", "load_file", "load_policies",
    "matching", "parse_duration", "parse_metadata", "resolve_backup", "resolve_snapshots", "selects",
    "validate_paths", "SnapshotSettings",
]
