"""Rebuild the catalog's restore points from a storage target's manifests.

The repository is the source of truth for what can be restored: a point exists there
exactly when its manifest is published (storage_backends/repository.py). When the
catalog is lost (a deleted SQLite file, a database restored from an old dump), every
published manifest of a storage target describes one point well enough to restore it:
its domain (name, UUID, XML), host, chain, parent, sequence number, level, strategy,
consistency, checkpoint, times, and each disk's key, size, SHA-256 and virtual size.

``read_repository`` lists the target once and reads every manifest; ``plan_rebuild``
(pure) decides, per manifest:

- already in the catalog (by point id, whatever its status): left as it is;
- imported as ``complete``, with ``manifest_sha256`` computed from the bytes just read,
  when it parses, lives where the layout puts it (its domain, chain and point id are
  those of its key), its artifacts are stored under it with the sizes it names, and its
  chain holds: a full is sequence 0 with no parent; an incremental's parent is in the
  same chain, one step before it, and is imported too or complete in the catalog;
- refused otherwise, with the reason; so is every point built on a refused one.

Nothing is re-hashed: ``virtwarden verify`` reads the data through afterwards. Imports
are plain inserts that lose to an existing row, so running it twice (or twice at once)
imports each point once.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from virtwarden.catalog import points
from virtwarden.catalog.points import ArtifactView, PointView
from virtwarden.catalog.store import Catalog
from virtwarden.storage_backends import repository
from virtwarden.storage_backends.base import Backend
from virtwarden.storage_backends.format2.repository import Format2Repository
from virtwarden.storage_backends.repository import Repository, is_manifest_key
from virtwarden.tasks.confine import TARGET

from virtwarden.errors import Transient, VirtwardenError

LEVELS = ("full", "incremental")


@dataclass(frozen=True)
class Found:
    """One published manifest as read: its content and the SHA-256 of its bytes, or why
    it could not be read."""

    key: str
    sha256: str | None = None
    data: dict | None = None
    error: str | None = None


@dataclass(frozen=True)
class Refused:
    key: str
    point: str
    problem: str

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "point": self.point, "problem": self.problem}


@dataclass(frozen=True)
class RebuildPlan:
    storage: str
    imports: tuple[PointView, ...]  # parents before the points built on them
    present: tuple[PointView, ...]  # in the catalog already: left as they are
    refused: tuple[Refused, ...]
    catalog_only: tuple[PointView, ...]  # complete in the catalog, but no manifest in storage


def read_repository(backend: Backend) -> tuple[list[Found], dict[str, int]]:
    """Every published manifest of the target, and the size of every stored object."""
    objects = {o.key: o.size for o in backend.list("")}
    repo = Repository(backend)
    found = []
    for key in sorted(k for k in objects if is_manifest_key(k)):
        try:
            stored = repo.load_manifest(key)
        except Transient:
            raise
        except VirtwardenError as e:
            found.append(Found(key, error=str(e)))
            continue
        found.append(Found(key, stored.sha256, stored.data))
    return found, objects


def read_format2(repo2: Format2Repository) -> tuple[list[Found], dict[str, int]]:
    """Every published manifest of a format-2 repository, opened with its key, and the
    size of every object under ``points/``."""
    objects = {o.key: o.size for o in repo2.backend.list("points/")}
    found = []
    for ref in repo2.points():
        try:
            blob = repo2.backend.get_bytes(ref.manifest_key)
            data = json.loads(repo2.codec.open("manifest", ref.manifest_key, blob))
        except Transient:
            raise
        except VirtwardenError as e:
            found.append(Found(ref.manifest_key, error=str(e)))
            continue
        found.append(Found(ref.manifest_key, hashlib.sha256(blob).hexdigest(), data))
    return found, objects


def plan_rebuild(storage: str, found: Sequence[Found], objects: Mapping[str, int],
                 known: Sequence[PointView]) -> RebuildPlan:
    """What to import from ``found`` into a catalog that has ``known`` points on
    ``storage``. Pure."""
    by_id = {p.id: p for p in known}
    candidates: dict[str, PointView] = {}
    refused: list[Refused] = []
    present: list[PointView] = []
    for f in found:
        try:
            point = point_of(storage, f)
            _check_artifacts(point, objects)
        except ValueError as e:
            refused.append(Refused(f.key, repository.point_of(f.key), str(e)))
            continue
        if point.id in by_id:
            present.append(by_id[point.id])
        elif point.id in candidates:
            refused.append(Refused(f.key, point.id, f"point id also used by {candidates.pop(point.id).manifest_key}"))
        else:
            candidates[point.id] = point
    chains = _Chains(candidates, by_id)
    imports = []
    for point in candidates.values():
        problem = chains.problem(point.id)
        if problem:
            refused.append(Refused(point.manifest_key, point.id, problem))
        else:
            imports.append(point)
    listed = {f.key for f in found}
    missing = [p for p in known if p.status == points.COMPLETE and p.manifest_key not in listed]
    order = sorted(imports, key=lambda p: (p.domain, p.chain_id, p.seq))
    return RebuildPlan(storage, tuple(order), tuple(present), tuple(sorted(refused, key=lambda r: r.key)),
                       tuple(missing))


def apply(cat: Catalog, plan: RebuildPlan) -> tuple[list[PointView], list[PointView]]:
    """Insert the plan's imports; (imported, found present meanwhile)."""
    imported: list[PointView] = []
    raced: list[PointView] = []
    for p in plan.imports:
        (imported if points.add_complete(cat, p) else raced).append(p)
    return imported, raced


# --- reading one manifest ----------------------------------------------------------------
def point_of(storage: str, f: Found) -> PointView:
    """The complete point a manifest describes; ValueError saying what is wrong with it."""
    if f.error is not None or f.data is None:
        raise ValueError(f"does not parse: {f.error}")
    m = f.data
    if m.get("format") == 2:
        return _format2_point(storage, f, m)
    domain, chain_id, point_id = f.key.split("/")[:3]
    dom = _field(m, "domain", dict)
    found = (_field(dom, "name", str, "domain.name"), _field(m, "chain_id", str), _field(m, "point_id", str))
    if found != (domain, chain_id, point_id):
        raise ValueError(f"it describes domain {found[0]}, chain {found[1]}, point {found[2]} but is stored as "
                         f"{domain}/{chain_id}/{point_id}")
    level, disks = _level_and_disks(m)
    artifacts = tuple(_artifact(d, i) for i, d in enumerate(disks))
    checkpoint = m.get("checkpoint") or {}
    return PointView(
        id=point_id, domain=domain, domain_uuid=_field(dom, "uuid", str, "domain.uuid"),
        host=str(m.get("host") or ""), storage=storage, strategy=_field(m, "strategy", str), chain_id=chain_id,
        parent_id=_optional(m, "parent_id"), seq=_field(m, "seq", int), level=level, status=points.COMPLETE,
        reason=m.get("reason") if isinstance(m.get("reason"), str) else None,
        consistency=str(m.get("consistency") or "crash"),
        checkpoint=checkpoint.get("name") if isinstance(checkpoint, dict) else None, manifest_key=f.key,
        size_bytes=sum(a.size_bytes for a in artifacts), job_id=None,
        created_at=_time(m, "created_at"), completed_at=_optional_time(m, "completed_at"),
        artifacts=artifacts, manifest_sha256=f.sha256)


def _format2_point(storage: str, f: Found, m: dict) -> PointView:
    """A format-2 manifest (``points/<domain tag>/<point id>/manifest``): a point complete
    on its own, its disks named by their indexes."""
    point_id = f.key.split("/")[2]
    if _field(m, "point_id", str) != point_id:
        raise ValueError(f"it describes point {m['point_id']} but is stored as {point_id}")
    dom = _field(m, "domain", dict)
    level, disks = _level_and_disks(m)
    prefix = f.key.rsplit("/", 1)[0] + "/"
    artifacts = tuple(ArtifactView(
        _target(d, i), f"{prefix}index.{_target(d, i)}", _field(d, "stored_bytes", int, f"disks[{i}].stored_bytes"),
        _field(d, "index_sha256", str, f"disks[{i}].index_sha256"),
        _field(d, "virtual_size", int, f"disks[{i}].virtual_size")) for i, d in enumerate(disks))
    checkpoint = m.get("checkpoint") or {}
    return PointView(
        id=point_id, domain=_field(dom, "name", str, "domain.name"),
        domain_uuid=_field(dom, "uuid", str, "domain.uuid"), host=str(m.get("host") or ""), storage=storage,
        strategy=_field(m, "strategy", str), chain_id=point_id,
        parent_id=None, seq=0, level=level, status=points.COMPLETE,
        reason=m.get("reason") if isinstance(m.get("reason"), str) else None,
        consistency=str(m.get("consistency") or "crash"),
        checkpoint=checkpoint.get("name") if isinstance(checkpoint, dict) else None, manifest_key=f.key,
        size_bytes=sum(a.size_bytes for a in artifacts), job_id=None,
        created_at=_time(m, "created_at"), completed_at=_optional_time(m, "completed_at"),
        artifacts=artifacts, manifest_sha256=f.sha256, format=2)


def _level_and_disks(m: dict) -> tuple[str, list]:
    level = _field(m, "level", str)
    if level not in LEVELS:
        raise ValueError(f"level {level!r} is not one of {', '.join(LEVELS)}")
    disks = _field(m, "disks", list)
    if not disks:
        raise ValueError("it names no disk")
    return level, disks


def _target(d: Any, i: int) -> str:
    if not isinstance(d, dict):
        raise ValueError(f"disks[{i}] is not a mapping")
    target = _field(d, "target", str, f"disks[{i}].target")
    if not TARGET.fullmatch(target):  # a file name on restore: never imported
        raise ValueError(f"disks[{i}].target: {target!r} is not a disk name libvirt gives (vda, sdb, ...)")
    return target


def _artifact(d: Any, i: int) -> ArtifactView:
    where = f"disks[{i}]"
    return ArtifactView(_target(d, i), _field(d, "key", str, f"{where}.key"),
                        _field(d, "size_bytes", int, f"{where}.size_bytes"),
                        _field(d, "sha256", str, f"{where}.sha256"),
                        _field(d, "virtual_size", int, f"{where}.virtual_size"))


def _field(m: dict, name: str, kind: type, shown: str | None = None) -> Any:
    value = m.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        raise ValueError(f"{shown or name}: missing or not a {kind.__name__} ({value!r})")
    return value


def _optional(m: dict, name: str) -> str | None:
    value = m.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: not a string ({value!r})")
    return value or None


def _time(m: dict, name: str) -> datetime:
    value = m.get(name)
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not an ISO 8601 time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _optional_time(m: dict, name: str) -> datetime | None:
    return None if m.get(name) is None else _time(m, name)


def _check_artifacts(p: PointView, objects: Mapping[str, int]) -> None:
    prefix = p.manifest_key.rsplit("/", 1)[0] + "/"
    for a in p.artifacts:
        if not a.key.startswith(prefix):
            raise ValueError(f"artifact {a.key} of disk {a.target} is not stored under its point ({prefix})")
        if a.key not in objects:
            raise ValueError(f"artifact {a.key} of disk {a.target} is missing")
        if p.format == 1 and objects[a.key] != a.size_bytes:  # a format-2 index's size is not the disk's
            raise ValueError(f"artifact {a.key} has {objects[a.key]} bytes; the manifest says {a.size_bytes}")


# --- chains ---------------------------------------------------------------------------------
class _Chains:
    """Whether each candidate's chain holds, down to its full; memoised."""

    def __init__(self, candidates: dict[str, PointView], known: dict[str, PointView]) -> None:
        self.candidates, self.known = candidates, known
        self._problems: dict[str, str | None] = {}

    def problem(self, point_id: str, seen: frozenset[str] = frozenset()) -> str | None:
        if point_id not in self._problems:
            if point_id in seen:
                return "its chain loops back to itself"
            self._problems[point_id] = self._judge(self.candidates[point_id], seen | {point_id})
        return self._problems[point_id]

    def _judge(self, p: PointView, seen: frozenset[str]) -> str | None:
        if p.format == 2:
            return None  # complete on its own
        if p.level == "full":
            return None if p.seq == 0 and p.parent_id is None else \
                f"a full must be sequence 0 without a parent (it is {p.seq}, parent {p.parent_id})"
        if p.parent_id is None:
            return "an incremental without a parent: chain broken"
        parent = self.candidates.get(p.parent_id) or self.known.get(p.parent_id)
        if parent is None:
            return f"chain broken: its parent {p.parent_id} has no manifest on this storage and is not in the catalog"
        mismatch = _link_mismatch(p, parent)
        if mismatch:
            return f"chain broken: {mismatch}"
        if p.parent_id in self.candidates:
            above = self.problem(p.parent_id, seen)
            return f"chain broken: its parent {p.parent_id} is not imported ({above})" if above else None
        if parent.status != points.COMPLETE:
            return f"chain broken: its parent {p.parent_id} is {parent.status} in the catalog"
        return None


def _link_mismatch(p: PointView, parent: PointView) -> str | None:
    if parent.chain_id != p.chain_id:
        return f"its parent {parent.id} is in chain {parent.chain_id}, not {p.chain_id}"
    if parent.seq != p.seq - 1:
        return f"it is sequence {p.seq}, its parent {parent.id} is {parent.seq}"
    if (parent.domain_uuid, parent.strategy) != (p.domain_uuid, p.strategy):
        return f"its parent {parent.id} is of another domain or strategy"
    return None


def summary(plan: RebuildPlan, imported: int, present: int, dry_run: bool) -> str:
    verb = "would import" if dry_run else "imported"
    text = (f"storage {plan.storage}: {verb} {imported} restore point(s); {present} already in the catalog (left as"
            f" they are); {len(plan.refused)} manifest(s) refused")
    if plan.catalog_only:
        text += f"; {len(plan.catalog_only)} complete point(s) in the catalog have no manifest in storage"
    return text
