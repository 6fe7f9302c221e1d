"""What a restore will do, decided before anything is read or written.

``plan_restore`` is a pure function: from the chain of the chosen point (catalog rows
and manifests), the destination asked for and, for a restore in place, the domain as
its host has it now, it gives a ``RestorePlan``: the chain (ids, levels, dates), the
bytes read from storage (only the layers each disk needs), where each disk's image goes
and in which format, and which domain is defined or has its disks replaced.
``--dry-run`` prints the plan; the jobs make the same plan and carry it out, so what a
dry run shows is what a job does. ``check_paths`` adds what only the filesystem knows
(a directory that is not new or empty, a file already in the way, an image to replace
that is missing), and ``confine_destination`` where an API or runbook request may write
(restore.allowed_dirs).

Destinations:

- ``to-dir``: ``DIR/<target>.qcow2`` per disk (and ``domain.xml``);
- ``as-domain``: ``<dir>/<name>-<target>.qcow2``, where ``<dir>`` is ``disk_dir`` or
  else the directory of that disk's image in the saved domain XML; a file-backed serial
  console goes to ``<dir>/<name>-serial.log`` (never the original's log);
- ``in-place``: each disk's own image (below any change-tracking overlays of ours),
  in the format it has now.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from virtwarden.catalog.points import PointView
from virtwarden.hypervisor.domxml import disk_sources
from virtwarden.tasks.confine import STAGING_PREFIX, confine
from virtwarden.tasks.restore import InvalidRestoreRequest, RestoreRefused, layers_for

from virtwarden.sizes import human_size

TO_DIR, AS_DOMAIN, IN_PLACE = "to-dir", "as-domain", "in-place"
MODES = (TO_DIR, AS_DOMAIN, IN_PLACE)
# What libvirt accepts as a domain name, limited to what is also safe in a file name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")


@dataclass(frozen=True)
class Destination:
    """Where a restore goes, as asked."""

    mode: str
    to_dir: str | None = None
    as_domain: str | None = None
    disk_dir: str | None = None  # as-domain: the directory for the new images
    start: bool = False
    discard_old: bool = False

    @classmethod
    def from_options(cls, *, to_dir: str | None = None, as_domain: str | None = None, in_place: bool = False,
                     disk_dir: str | None = None, start: bool = False, discard_old: bool = False) -> Destination:
        modes = [m for m, on in ((TO_DIR, to_dir), (AS_DOMAIN, as_domain), (IN_PLACE, in_place)) if on]
        if len(modes) != 1:
            raise InvalidRestoreRequest("choose exactly one of: a directory (to_dir), a new domain (as_domain), "
                                        "in place (in_place)")
        dest = cls(modes[0], to_dir or None, as_domain or None, disk_dir or None, start, discard_old)
        dest.check()
        return dest

    def check(self) -> None:
        if self.start and self.mode == TO_DIR:
            raise InvalidRestoreRequest("--start needs --as-domain or --in-place: a directory of images has "
                                        "nothing to start")
        if self.discard_old and self.mode != IN_PLACE:
            raise InvalidRestoreRequest("--discard-old goes with --in-place only")
        if self.disk_dir and self.mode != AS_DOMAIN:
            raise InvalidRestoreRequest("--disk-dir goes with --as-domain only")
        if self.mode == AS_DOMAIN and not _NAME.match(self.as_domain or ""):
            raise InvalidRestoreRequest(f"{self.as_domain!r} is not a usable domain name: use letters, digits and "
                                        "'_.+-', starting with a letter or digit")
        for what, path in (("--to-dir", self.to_dir), ("--disk-dir", self.disk_dir)):
            if path and not Path(path).is_absolute():
                raise InvalidRestoreRequest(f"{what} must be an absolute path (the worker may run elsewhere): "
                                            f"{path!r}")


@dataclass(frozen=True)
class LiveDisk:
    """A disk of the domain a restore in place replaces, as its host has it now."""

    target: str
    path: str  # the disk's own image: where the restored image goes
    format: str  # that image's format, which the restored image keeps
    source_type: str  # file | block
    replaces: tuple[str, ...]  # the images set aside: the active one first, down to ``path``


@dataclass(frozen=True)
class LiveDomain:
    name: str
    uuid: str
    state: str
    persistent: bool
    disks: tuple[LiveDisk, ...]
    managed_save: bool = False  # saved memory state (virsh managedsave) its next start would resume
    snapshots: tuple[str, ...] = ()  # libvirt snapshots: they describe the current disks

    def disk(self, target: str) -> LiveDisk | None:
        return next((d for d in self.disks if d.target == target), None)


@dataclass(frozen=True)
class ChainEntry:
    id: str
    level: str
    created_at: datetime
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "level": self.level, "created_at": self.created_at.isoformat(),
                "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class DiskPlan:
    target: str
    layers: tuple[str, ...]  # point ids whose image of this disk is read, bottom (full) first
    read_bytes: int
    virtual_size: int
    path: str  # where the restored image ends up
    format: str
    replaces: tuple[str, ...] = ()  # in place: images set aside until the restore succeeded

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "path": self.path, "format": self.format, "layers": list(self.layers),
                "read_bytes": self.read_bytes, "virtual_size": self.virtual_size, "replaces": list(self.replaces)}


@dataclass(frozen=True)
class DomainPlan:
    """The domain a restore defines (as-domain) or whose disks it replaces (in-place)."""

    name: str
    uuid: str | None  # None: a new random UUID, made when the job runs
    action: str  # define | replace-disks
    state: str | None = None  # in place: its state now (it is shut off first)
    update_definition: bool = False  # in place: a disk's source changes (tracking overlays go)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "action": self.action, "state": self.state,
                "update_definition": self.update_definition}


@dataclass(frozen=True)
class RestorePlan:
    mode: str
    domain: str  # the backed-up domain
    source_uuid: str
    host: str
    storage: str
    selected: str  # how the point was chosen, in words
    chain: tuple[ChainEntry, ...]  # full first; the last one is the point restored
    disks: tuple[DiskPlan, ...]
    define: DomainPlan | None = None
    to_dir: str | None = None
    serial_log: str | None = None
    start: bool = False
    discard_old: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def point(self) -> ChainEntry:
        return self.chain[-1]

    @property
    def read_bytes(self) -> int:
        return sum(d.read_bytes for d in self.disks)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "domain": self.domain, "source_uuid": self.source_uuid, "host": self.host,
            "storage": self.storage, "point": self.point.to_json(), "selected": self.selected,
            "chain": [c.to_json() for c in self.chain], "read_bytes": self.read_bytes,
            "disks": [d.to_json() for d in self.disks],
            "domain_definition": self.define.to_json() if self.define else None,
            "to_dir": self.to_dir, "serial_log": self.serial_log, "start": self.start,
            "discard_old": self.discard_old, "notes": list(self.notes),
        }

    def describe(self) -> list[str]:
        """The plan for a human, one fact per line."""
        p = self.point
        lines = [f"restore {self.domain} ({self.mode}) on host {self.host}",
                 f"  point    {p.id} ({p.level}, {_when(p.created_at)}), {self.selected}",
                 f"  chain    {len(self.chain)} point(s) on storage {self.storage}:"]
        lines += [f"             {c.id}  {c.level:<11}  {_when(c.created_at)}  {human_size(c.size_bytes)}"
                  for c in self.chain]
        lines.append(f"  read     {human_size(self.read_bytes)}, every checksum verified before anything is written")
        for d in self.disks:
            lines.append(f"  disk     {d.target} -> {d.path} ({d.format}, {human_size(d.virtual_size)} virtual, "
                         f"{len(d.layers)} layer(s))")
            if d.replaces:
                fate = ("deleted once the restore succeeded" if self.discard_old
                        else "kept as <image>.before-restore-<time>")
                lines.append(f"           replaces {', '.join(d.replaces)} (moved aside; {fate})")
        if self.to_dir:
            lines.append(f"  xml      {Path(self.to_dir) / 'domain.xml'} (the domain XML at backup time)")
        if self.serial_log:
            lines.append(f"  serial   {self.serial_log}")
        if self.define:
            dp = self.define
            if dp.action == "define":
                lines.append(f"  domain   define {dp.name!r}, {'UUID ' + dp.uuid if dp.uuid else 'a new random UUID'}, "
                             "new MAC addresses, from the saved XML")
            else:
                stop = ("already shut off" if dp.state in ("shutoff", "crashed")
                        else f"now {dp.state}: shut off first (clean shutdown, then power-off)")
                lines.append(f"  domain   {dp.name!r} (UUID {dp.uuid}, {stop}), disks replaced"
                             + (", definition updated" if dp.update_definition else ""))
            lines.append(f"  start    {'yes' if self.start else 'no'}")
        lines += [f"  note     {n}" for n in self.notes]
        return lines


def plan_restore(points: list[PointView], manifests: list[dict], dest: Destination, *, host: str,
                 selected: str, live: LiveDomain | None = None, new_uuid: str | None = None) -> RestorePlan:
    """The plan for restoring ``points[-1]`` (``points`` is its chain, full first, and
    ``manifests`` theirs) to ``dest``. Pure; RestoreRefused when it cannot be done."""
    dest.check()
    point = points[-1]
    newest = manifests[-1]
    saved = {d["target"]: d for d in newest["disks"]}
    stacks = {t: layers_for(manifests, t) for t in saved}
    by_key = {d["key"]: m["point_id"] for m in manifests for d in m["disks"]}
    notes: list[str] = []
    placed: dict[str, tuple[str, str, tuple[str, ...]]]  # target -> (path, format, replaces)
    define = serial = None
    if dest.mode == TO_DIR:
        placed = {t: (str(Path(dest.to_dir or "") / f"{t}.qcow2"), "qcow2", ()) for t in saved}
    elif dest.mode == AS_DOMAIN:
        name = dest.as_domain or ""
        placed, serial = _as_domain_paths(newest["domain"]["xml"], saved, name, dest.disk_dir)
        define = DomainPlan(name, new_uuid, "define")
    else:
        placed, define = _in_place(point, saved, live, notes)
    disks = tuple(
        DiskPlan(t, tuple(by_key[d["key"]] for d in stacks[t]), sum(d["size_bytes"] for d in stacks[t]),
                 int(saved[t]["virtual_size"]), *placed[t])
        for t in saved)
    chain = tuple(ChainEntry(p.id, p.level, p.created_at, p.size_bytes) for p in points)
    return RestorePlan(dest.mode, point.domain, point.domain_uuid, host, point.storage, selected, chain, disks,
                       define, dest.to_dir if dest.mode == TO_DIR else None, serial, dest.start,
                       dest.discard_old, tuple(notes))


def _as_domain_paths(xml: str, saved: dict[str, dict], name: str,
                     disk_dir: str | None) -> tuple[dict[str, tuple[str, str, tuple[str, ...]]], str | None]:
    sources = disk_sources(xml)
    placed: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for t in saved:
        where = disk_dir or _parent(sources.get(t) or "")
        if not where:
            raise RestoreRefused(f"the saved XML names no image file for disk {t} (a block device?); "
                                 "give a directory for the new images (--disk-dir)")
        placed[t] = (str(Path(where) / f"{name}-{t}.qcow2"), "qcow2", ())
    first = Path(next(iter(placed.values()))[0]).parent
    serial = str(first / f"{name}-serial.log") if _file_console(xml) else None
    return placed, serial


def _parent(path: str) -> str:
    return str(Path(path).parent) if path.startswith("/") and not path.startswith("/dev/") else ""


def _file_console(xml: str) -> bool:
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return False
    return any(el.get("type") == "file" for tag in ("serial", "console") for el in devices.findall(tag))


def _in_place(point: PointView, saved: dict[str, dict], live: LiveDomain | None,
              notes: list[str]) -> tuple[dict[str, tuple[str, str, tuple[str, ...]]], DomainPlan]:
    if live is None:
        raise RestoreRefused(f"domain {point.domain!r} is not defined on the host: nothing to restore in place "
                             "(restore it --as-domain instead)")
    if not live.persistent:
        raise RestoreRefused(f"domain {live.name!r} is transient: shutting it off would remove it; "
                             "restore it --as-domain instead")
    if live.snapshots:
        raise RestoreRefused(f"domain {live.name!r} has snapshots ({', '.join(live.snapshots)}) that belong to its "
                             "current disks and would be left broken by a restore in place; delete them first "
                             f"(virsh snapshot-delete {live.name} NAME), or restore --as-domain instead")
    placed = {}
    for t in saved:
        disk = live.disk(t)
        if disk is None:
            raise RestoreRefused(f"domain {live.name!r} has no disk {t} now, but restore point {point.id} has: "
                                 "restore it --as-domain or --to-dir instead")
        if disk.source_type != "file":
            raise RestoreRefused(f"disk {t} of {live.name!r} is a {disk.source_type} device; a restore in place "
                                 "replaces image files only (restore --to-dir and copy it onto the device)")
        placed[t] = (disk.path, disk.format, disk.replaces)
    extra = [d.target for d in live.disks if d.target not in saved]
    if extra:
        notes.append(f"disk {', '.join(extra)} is not in the restore point and is left as it is")
    if live.managed_save:
        notes.append(f"{live.name!r} has saved memory state (managed save) that belongs to its current disks; "
                     "it is discarded, so the domain boots afresh on the restored ones")
    if live.uuid != point.domain_uuid:
        notes.append(f"the domain's UUID is now {live.uuid}; the point was made of UUID {point.domain_uuid}")
    moved = any(live.disk(t).replaces != (placed[t][0],) for t in saved)  # type: ignore[union-attr]
    return placed, DomainPlan(live.name, live.uuid, "replace-disks", live.state, moved)


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_paths(plan: RestorePlan) -> None:
    """What only the filesystem can say (where it is visible: the worker checks again):
    no file in the way of a new one, and every image a restore in place replaces exists."""
    if plan.mode == IN_PLACE:
        missing = [p for d in plan.disks for p in d.replaces if not Path(p).exists()]
        if missing:
            raise RestoreRefused(f"cannot restore {plan.domain!r} in place: {', '.join(missing)} does not exist")
        return
    if plan.mode == TO_DIR:
        _new_or_empty(plan.to_dir or "")
        return
    # A symbolic link counts as taken, dangling or not: nothing is written through one.
    taken = [d.path for d in plan.disks if os.path.lexists(d.path)]
    if plan.serial_log and os.path.lexists(plan.serial_log):
        taken.append(plan.serial_log)
    if taken:
        raise RestoreRefused(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; choose "
                             "another name or --disk-dir (nothing was changed)")


def _new_or_empty(to_dir: str) -> None:
    """A restore into a directory needs a new or empty one (the worker checks again)."""
    if not os.path.lexists(to_dir):
        return
    if not os.path.isdir(to_dir):
        raise RestoreRefused(f"{to_dir} exists and is not a directory; choose a new or empty directory "
                             "(nothing was changed)")
    held = sorted(n for n in os.listdir(to_dir) if not n.startswith(STAGING_PREFIX))
    if held:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise RestoreRefused(f"{to_dir} already holds {shown}; choose a new or empty directory "
                             "(nothing was changed)")


def confine_destination(dest: Destination, roots: tuple[str, ...]) -> None:
    """The directories a confined request names (to_dir, disk_dir) must be under
    ``roots`` after symbolic links are resolved (tasks/confine.py); DestinationRefused
    otherwise. A new domain's images beside the original's go where its saved XML
    (checksummed in the catalog) says, not where the request says: they are not judged."""
    if dest.to_dir:
        confine(dest.to_dir, roots, "to_dir")
    if dest.disk_dir:
        confine(dest.disk_dir, roots, "disk_dir")
