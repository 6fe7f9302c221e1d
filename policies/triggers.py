"""Which jobs an event starts: the policies' ``on:`` triggers (pure, no I/O).

For each job (backup, snapshot, drill) the policy that governs that job for the domain
(policies.select.governing: highest priority, ties are an error) is the only one whose
triggers count. Another policy that also selects the domain and lists the same event
never adds a second job: one event starts a job at most once, with the governing
policy's settings, so a domain is never backed up twice to two targets because two
policies overlap. When the governing policy has no trigger for the event, nothing
runs, even if a lower-priority policy has one (the governing policy speaks alone).

Example: ``on: [{event: domain.started, run: backup}]`` backs a domain up each time it
starts; the backup job itself decides full or incremental (the first one is a full).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from virtwarden.policies.model import EVENTS, Policy, Run
from virtwarden.policies.select import DomainFacts, governing

RUNS: tuple[Run, ...] = ("backup", "snapshot", "drill")


@dataclass(frozen=True)
class TriggerAction:
    """Run ``run`` for the domain with the settings of ``policy``; ``full`` forces a full backup."""

    policy: str
    run: Run
    full: bool = False


def triggers_for(event_kind: str, facts: DomainFacts, policies: Iterable[Policy],
                 runs: Sequence[Run] = RUNS) -> list[TriggerAction]:
    """The jobs that ``event_kind`` (e.g. ``domain.started``) starts for the domain.

    Events that no policy can name (block jobs, ``domain.updated``...) start nothing.
    Raises PolicyError when two policies govern one of ``runs`` with the same priority.
    """
    if event_kind not in EVENTS:
        return []
    found = list(policies)
    actions = []
    for run in runs:
        chosen = governing(found, facts, run)
        if chosen is None:
            continue
        hits = [t for t in chosen.spec.on if t.event == event_kind and t.run == run]
        if hits:
            actions.append(TriggerAction(chosen.name, run, any(t.full for t in hits)))
    return actions


def listened_events(policies: Iterable[Policy]) -> set[str]:
    """The events any policy has a trigger for (the others start nothing)."""
    return {t.event for p in policies for t in p.spec.on}
