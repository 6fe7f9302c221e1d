"""``virtwarden hosts``: each configured host as libvirt describes it now.

Every host is asked (never guessed from an earlier answer): reachable or not, CPUs,
total and free memory (MemFree + buffers + page cache), its running domains and the
vCPUs and memory they were given. What was learned is recorded in the catalog's
``hosts`` table (state, last error, capacity).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from virtwarden.catalog import moves
from virtwarden.catalog.store import Catalog
from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.config import Config
from virtwarden.errors import EXIT_OK, VirtwardenError
from virtwarden.redact import mask

MiB = 1024 * 1024


@dataclass(frozen=True)
class HostReport:
    name: str
    uri: str
    group: str
    shared_storage: bool
    up: bool
    error: str | None
    capacity: dict | None

    def to_json(self) -> dict:
        return {"name": self.name, "uri": self.uri, "group": self.group, "shared_storage": self.shared_storage,
                "state": "up" if self.up else "down", "error": self.error, "capacity": self.capacity}


def survey(cfg: Config, cat: Catalog | None = None) -> list[HostReport]:
    from virtwarden.hypervisor import connect
    from virtwarden.hypervisor.migrate import capacity

    out = []
    for name, h in sorted(cfg.hosts.items()):
        try:
            with connect(name, h.uri) as hv:
                cap = capacity(hv).to_json()
            report = HostReport(name, mask(h.uri), h.group, h.shared_storage, True, None, cap)
        except VirtwardenError as e:
            report = HostReport(name, mask(h.uri), h.group, h.shared_storage, False, mask(str(e)), None)
        if cat is not None:
            moves.note_host(cat, name, uri=h.uri, group=h.group, up=report.up, error=report.error,
                            capacity=report.capacity)
        out.append(report)
    return out


def cli(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    found = survey(cfg, Catalog(cfg.catalog_url))
    if args.json:
        emit_json([r.to_json() for r in found])
        return EXIT_OK
    rows = []
    for r in found:
        c = r.capacity or {}
        if r.up:
            rows.append([r.name, r.group, "yes" if r.shared_storage else "no", "up", str(c["cpus"]),
                         f"{c['memory_free'] // MiB} / {c['memory_total'] // MiB} MiB",
                         f"{c['running']} ({c['vcpus_running']} vCPUs, {c['memory_running'] // MiB} MiB)", r.uri])
        else:
            rows.append([r.name, r.group, "yes" if r.shared_storage else "no", "DOWN", "-", "-", "-", r.uri])
    print(table(rows, ["HOST", "GROUP", "SHARED", "STATE", "CPUS", "FREE / TOTAL MEMORY", "RUNNING", "URI"]))
    for r in found:
        if not r.up:
            print(f"{r.name}: {r.error}")
    return EXIT_OK
