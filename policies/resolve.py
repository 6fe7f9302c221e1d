"""Turning policies and the configuration into the settings of one backup or snapshot.

The configuration is used as plain data (``policies_path``, ``storage`` and its
``storage_target`` lookup); nothing here talks to libvirt or a storage backend, so a
request is settled (or refused with a clear message) before any job is created.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtwarden.policies.loader import load_dir
from virtwarden.policies.model import Backup, Policy, Snapshots
from virtwarden.policies.select import DomainFacts, by_name, governing

from virtwarden.errors import PolicyError
from virtwarden.validation import suggest

if TYPE_CHECKING:  # only annotations here: ``policy validate`` need not build the configuration's models
    from virtwarden.config import Config

# Used when no policy selects the domain (a one-off backup of an unmanaged domain).
DEFAULT_STRATEGY = "bitmap"
DEFAULT_FULL_EVERY = 7
DEFAULT_QUIESCE = "auto"


@dataclass(frozen=True)
class BackupSettings:
    """Everything a backup job needs from policy: ``policy`` None means built-in defaults."""

    policy: str | None
    target: str
    strategy: str
    full_every: int
    quiesce: str
    retention: dict | None = None  # the policy's backup.retention, as plain data

    def job_params(self, domain: str, *, full: bool = False) -> dict:
        """The backup job's parameters (tasks.backup.BackupRequest), as JSON data: the
        one place the CLI, the scheduler and the listener get them from."""
        return {"domain": domain, "storage": self.target, "strategy": self.strategy,
                "full_every": self.full_every, "force_full": full, "policy": self.policy,
                "retention": self.retention, "quiesce": self.quiesce}


def load_policies(cfg: Config) -> list[Policy]:
    """The policies of the configured policy directory; none when it does not exist."""
    return load_dir(cfg.policies_path, missing_ok=True)  # within loader.held(): no stat at all


def resolve_backup(cfg: Config, domain: str, *, policy: str | None = None, target: str | None = None,
                   host: str | None = None, metadata: dict[str, str] | None = None) -> BackupSettings:
    """The settings for backing up ``domain`` now.

    A named ``policy`` is used even when its selector does not match the domain (the
    operator asked for it); otherwise the governing policy (see policies.select). With
    no policy, defaults apply when the target is clear: given, or the only storage.
    ``target`` overrides the policy's. Raises NotFound, PolicyError, UnknownStorage.
    """
    found = load_policies(cfg)
    chosen = by_name(found, policy) if policy else governing(found, DomainFacts(domain, host, metadata or {}))
    if chosen is None:
        settings = BackupSettings(None, target or _only_storage(cfg, domain), DEFAULT_STRATEGY,
                                  DEFAULT_FULL_EVERY, DEFAULT_QUIESCE)
    else:
        backup = _backup_section(chosen)
        retention = backup.retention.model_dump() if backup.retention else None
        settings = BackupSettings(chosen.name, target or backup.target, backup.strategy, backup.full_every,
                                  backup.quiesce, retention)
    cfg.storage_target(settings.target)  # UnknownStorage with a did-you-mean and the configured names
    return settings


@dataclass(frozen=True)
class SnapshotSettings:
    """Everything a snapshot job needs from policy: ``policy`` None means a one-off
    snapshot with the defaults, which no rotation ever deletes."""

    policy: str | None
    type: str  # internal | external
    quiesce: str
    retention: dict | None = None

    def job_params(self, domain: str) -> dict:
        """The snapshot job's parameters (tasks.snapshots.SnapshotRequest)."""
        return {"domain": domain, "policy": self.policy, "type": self.type, "quiesce": self.quiesce,
                "retention": self.retention}


def resolve_snapshots(cfg: Config, domain: str, *, policy: str | None = None, host: str | None = None,
                      metadata: dict[str, str] | None = None) -> SnapshotSettings:
    """The settings for a snapshot of ``domain`` now: the named policy's, else the
    governing one's (for the snapshot job), else the defaults (internal, no rotation)."""
    found = load_policies(cfg)
    chosen = (by_name(found, policy) if policy
              else governing(found, DomainFacts(domain, host, metadata or {}), "snapshot"))
    if chosen is None:
        defaults = Snapshots()
        return SnapshotSettings(None, defaults.type, defaults.quiesce)
    section = chosen.spec.snapshots
    if section is None:
        raise PolicyError(f"{chosen.source_text}: policy {chosen.name!r} has no spec.snapshots section:"
                          " it does not say how to snapshot")
    retention = section.retention.model_dump() if section.retention else None
    return SnapshotSettings(chosen.name, section.type, section.quiesce, retention)


def _backup_section(chosen: Policy) -> Backup:
    if chosen.spec.backup is None:
        raise PolicyError(f"{chosen.source_text}: policy {chosen.name!r} has no spec.backup section:"
                          " it cannot say where or how to back up")
    return chosen.spec.backup


def _only_storage(cfg: Config, domain: str) -> str:
    names = sorted(cfg.storage)
    if len(names) == 1:
        return names[0]
    if not names:
        raise PolicyError(f"no policy selects domain {domain!r} and no storage is configured:"
                          " add one under 'storage:' in the configuration file")
    raise PolicyError(f"no policy selects domain {domain!r} and {len(names)} storage targets are configured"
                      f" ({', '.join(names)}): name one with --target or write a policy")


def check_against_config(policies: list[Policy], cfg: Config) -> list[str]:
    """Error lines for policies that name storage the configuration does not have."""
    configured = sorted(cfg.storage)
    lines = []
    for found in policies:
        spec = found.spec
        named = [(("spec", "backup", "target"), spec.backup.target if spec.backup else None),
                 (("spec", "drill", "target"), spec.drill.target if spec.drill else None),
                 (("spec", "verify", "target"), spec.verify.target if spec.verify else None)]
        for path, name in named:
            if name is not None and name not in cfg.storage:
                lines.append(f"{found.source.at(path)}: {'.'.join(path)}: storage {name!r} is not configured"
                             f"{suggest(name, configured)} (configured: {', '.join(configured) or 'none'})")
    return lines
