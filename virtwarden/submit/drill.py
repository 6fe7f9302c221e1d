"""Drills: the settings are settled here, where the configuration and the policies are,
and travel in the job's parameters (tasks.drill.DrillRequest): the policy named, else
the one that governs drills of the domain (policies.select; a policy with a backup
section and no drill section drills with the defaults), else the defaults (latest
point, 60 s, no marker, no agent check, no network). Selection uses what the catalog
knows, like ``prune``: the name, the host of the newest restore point and, when some
policy selects by metadata, the metadata saved with that point, so a domain that no
longer exists can still be drilled. The point is resolved now (an unknown id or a
domain without points is an error before any job exists).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from virtwarden.catalog import points
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import PolicyError
from virtwarden.policies import load_policies
from virtwarden.policies.model import Drill, Policy
from virtwarden.policies.select import by_name, governing
from virtwarden.submit import Planned, catalog_facts
from virtwarden.tasks.drill import DrillRequest, check_request, pick_point


def drill_params(cfg: Config, cat: Catalog, domain: str, *, point: str | None = None, policy: str | None = None,
                 host: str | None = None) -> dict[str, Any]:
    """The drill job's parameters (a DrillRequest as JSON data). ``point`` None: the
    policy's ``drill.point``."""
    found = load_policies(cfg)
    chosen = (by_name(found, policy) if policy
              else governing(found, catalog_facts(cfg, cat, domain, found, host), "drill"))
    section = _section(chosen)
    storage = section.target or (chosen.spec.backup.target if chosen and chosen.spec.backup else None)
    if storage is not None:
        cfg.storage_target(storage)  # UnknownStorage, with the configured names
    resolved = pick_point(cat, domain, point or section.point, storage)
    req = DrillRequest(domain=domain, policy=chosen.name if chosen else None, point=resolved.id, storage=storage,
                       run_for=float(section.run_for),
                       boot_timeout=float(section.boot_timeout), serial_marker=section.serial_marker,
                       expect_agent=section.expect_agent, network=section.network)
    check_request(req)
    return asdict(req)


def plan_drill(cfg: Config, cat: Catalog, domain: str | None, *, point: str | None = None,
               policy: str | None = None, host: str | None = None, known_on_host: bool = False) -> Planned:
    """A drill of ``domain``; ``point`` is an id, ``latest``, ``oldest`` or None (the
    policy's choice). It runs on ``host``, else on the host that made the point.
    (``known_on_host`` changes nothing: the drill is decided from the catalog.)"""
    assert domain is not None
    params = drill_params(cfg, cat, domain, point=point, policy=policy, host=host)
    if host is None:
        made_on = points.get(cat, params["point"]).host
        host = made_on if made_on in cfg.hosts else next(iter(cfg.hosts))
    cfg.host(host)  # UnknownHost
    return Planned("drill", domain, host, params, {"host": host, **params})


def _section(chosen: Policy | None) -> Drill:
    if chosen is None:
        return Drill()
    section = chosen.section("drill")
    if not isinstance(section, Drill):
        raise PolicyError(f"{chosen.source_text}: policy {chosen.name!r} has no spec.drill or spec.backup section:"
                          " it says nothing about drills")
    return section
