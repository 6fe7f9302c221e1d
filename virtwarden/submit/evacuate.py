"""Evacuations: move a host's running domains elsewhere, live. The request checks the
hosts and settles each domain's migration policy (targets, timeout; the evacuation's
parallelism is the smallest ``max_parallel`` among them, 2 when no policy says)."""
from __future__ import annotations

from dataclasses import asdict

from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import PolicyError, UsageError
from virtwarden.policies import DomainFacts, governing, load_policies, parse_metadata
from virtwarden.policies.placement import max_parallel
from virtwarden.submit import Planned
from virtwarden.tasks.evacuate import DEFAULT_TIMEOUT, EvacuateRequest


def plan_evacuate(cfg: Config, cat: Catalog, host: str | None, *, to: tuple[str, ...] | list[str] = ()) -> Planned:
    """An evacuation of ``host``: one job on its queue; the preview is the plan with the
    capacity of now (``policies.placement.Plan.to_json``). The job plans again when it
    runs, with the capacity of that moment."""
    from virtwarden.tasks import evacuate

    assert host is not None
    req = build_request(cfg, host, tuple(to))
    preview = {"dry_run": True, "max_parallel": req.max_parallel, **evacuate.plan(req).to_json()}
    return Planned("evacuate", None, host, asdict(req), preview)


def build_request(cfg: Config, host: str, to: tuple[str, ...] = ()) -> EvacuateRequest:
    """The job's request: every configured host, and the migration settings of each
    domain on ``host`` from the policy that governs it."""
    from virtwarden.hypervisor import connect

    cfg.host(host)  # UnknownHost with the configured names
    for name in to:
        cfg.host(name)
    if host in to:
        raise UsageError(f"cannot evacuate host {host} onto itself: leave it out of --to")
    policies = load_policies(cfg)
    with connect(host, cfg.host(host).uri) as hv:
        found = hv.domains(sizes=False)
    settings: dict[str, dict] = {}
    limits = []
    for info in found:
        try:
            chosen = governing(policies, DomainFacts(info.name, host, parse_metadata(info.xml)), "migration")
        except PolicyError as e:
            settings[info.name] = {"refused": f"its migration policies conflict: {e}"}
            continue
        if chosen is None or chosen.spec.migration is None:
            continue
        m = chosen.spec.migration
        settings[info.name] = {"policy": chosen.name, "targets": list(m.targets) if m.targets else None,
                               "timeout": m.timeout}
        limits.append(m.max_parallel)
    hosts = {name: {"uri": h.uri, "group": h.group, "shared_storage": h.shared_storage,
                    "memory_reserve_mib": h.memory_reserve_mib,
                    "migration_bandwidth_mib": h.migration_bandwidth_mib} for name, h in cfg.hosts.items()}
    return EvacuateRequest(host=host, hosts=hosts, to=list(to), max_parallel=max_parallel(limits),
                           domains=settings, timeout=DEFAULT_TIMEOUT)
