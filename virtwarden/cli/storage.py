"""``virtwarden storage points|restore|stats|gc STORAGE``: a format-2 repository read and
tended with nothing but the storage and its key: no catalog, no broker, no worker.

- ``points`` lists the points the repository holds (from their manifests);
- ``restore POINT --to-dir DIR`` writes each disk of a point as ``<disk>.qcow2`` and its
  domain XML into a new or empty directory: the way back when the catalog is lost;
- ``stats`` says what the repository stores: bytes the disks hold, bytes stored, and
  what deduplication and compression saved, per domain and in all;
- ``gc`` deletes the chunks no point uses (never while a backup writes to it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from virtwarden.cli.output import emit_json, load_config, table
from virtwarden.errors import EXIT_OK, RestorePointNotFound, RestoreRefused
from virtwarden.hypervisor import qemu_img
from virtwarden.storage_backends.format2.access import open_repository
from virtwarden.storage_backends.format2.repository import DomainUsage, Format2Repository, PointRef
from virtwarden.tasks.confine import check_target


def _open(args: argparse.Namespace) -> Format2Repository:
    cfg = load_config(args)
    return open_repository(args.storage, cfg.storage_target(args.storage), prompt=True)


def _manifests(repo: Format2Repository) -> list[tuple[PointRef, dict]]:
    found = []
    for ref in repo.points():
        try:
            found.append((ref, repo.manifest(ref)))
        except RestorePointNotFound:
            continue  # deleted meanwhile
    return sorted(found, key=lambda rm: (rm[1]["domain"]["name"], rm[1].get("created_at", "")))


def points_cli(args: argparse.Namespace) -> int:
    repo = _open(args)
    rows = [{"id": m["point_id"], "domain": m["domain"]["name"], "created_at": m.get("created_at"),
             "level": m.get("level"), "consistency": m.get("consistency"),
             "disks": [{"target": d["target"], "virtual_size": d["virtual_size"]} for d in m["disks"]]}
            for _ref, m in _manifests(repo) if not args.domain or m["domain"]["name"] == args.domain]
    if args.json:
        emit_json(rows)
        return EXIT_OK
    print(table([[r["id"], r["domain"], r["created_at"] or "", r["consistency"] or "",
                  ",".join(d["target"] for d in r["disks"])] for r in rows],
                ["POINT", "DOMAIN", "CREATED", "CONSISTENCY", "DISKS"]))
    return EXIT_OK


def restore_cli(args: argparse.Namespace) -> int:
    from virtwarden.tasks.restore import served_disks

    repo = _open(args)
    found = [(ref, m) for ref, m in _manifests(repo) if m["point_id"] == args.point]
    if not found:
        raise RestorePointNotFound(f"storage {args.storage} holds no point {args.point}")
    ref, manifest = found[0]
    out = Path(args.to_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RestoreRefused(f"{out} exists and is not an empty directory; nothing was written")
    targets = [d["target"] for d in manifest["disks"]]
    for t in targets:
        check_target(t, args.point)  # targets become file names
    indexes = repo.indexes(ref, manifest)  # each checked against the manifest, before anything is written
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".restoring-", dir=out))
    try:
        with served_disks(repo.chunks, indexes, args.point, work) as served:
            for index in indexes:
                qemu_img.flatten([served[index.target]], work / f"{index.target}.qcow2")
        (work / "domain.xml").write_text(manifest["domain"]["xml"])
        for name in (*[f"{t}.qcow2" for t in targets], "domain.xml"):
            os.replace(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = [str(out / f"{t}.qcow2") for t in targets]
    if args.json:
        emit_json({"point_id": args.point, "domain": manifest["domain"]["name"], "to_dir": str(out),
                   "disks": written})
    else:
        print(f"point {args.point} of {manifest['domain']['name']} restored into {out}: {', '.join(written)}, "
              "domain.xml")
    return EXIT_OK


def stats_cli(args: argparse.Namespace) -> int:
    repo = _open(args)
    usage = repo.usage()

    def figures(u: DomainUsage) -> dict:
        unique = u.chunks * usage.chunk_size  # an upper bound: a disk's last chunk may be shorter
        return {"logical_bytes": u.logical_bytes, "unique_bytes": unique, "stored_bytes": u.stored_bytes,
                "dedup_ratio": round(u.logical_bytes / unique, 2) if unique else None,
                "compression_ratio": round(unique / u.stored_bytes, 2) if u.stored_bytes else None}

    result = {"storage": args.storage, "repository": repo.config["repository"], "chunk_size": usage.chunk_size,
              "chunk_ids": repo.chunk_ids,
              "chunks_stored": usage.chunks_stored, "chunks_unused": usage.chunks_unused,
              **figures(usage.total), "stored_bytes_all": usage.stored_bytes,
              "domains": {name: {"points": u.points, **figures(u)} for name, u in usage.domains.items()}}
    if args.json:
        emit_json(result)
        return EXIT_OK
    print(table([[name, str(d["points"]), _mib(d["logical_bytes"]), _mib(d["stored_bytes"]),
                  _ratio(d["dedup_ratio"]), _ratio(d["compression_ratio"])] for name, d in result["domains"].items()],
                ["DOMAIN", "POINTS", "LOGICAL", "STORED", "DEDUP", "COMPRESSION"]))
    print(f"\nrepository {result['repository']}: {_mib(result['logical_bytes'])} in its points, "
          f"{_mib(result['stored_bytes_all'])} stored in {usage.chunks_stored} chunks "
          f"({result['chunks_unused']} unused: virtwarden storage gc {args.storage}); "
          f"dedup {_ratio(result['dedup_ratio'])}, compression {_ratio(result['compression_ratio'])}")
    return EXIT_OK


def gc_cli(args: argparse.Namespace) -> int:
    repo = _open(args)
    report = repo.gc()
    said = {"storage": args.storage, "chunks": report.chunks, "referenced": report.referenced,
            "deleted": report.deleted, "deleted_bytes": report.deleted_bytes, "deferred": report.deferred}
    if args.json:
        emit_json(said)
    elif report.deferred:
        print(f"storage {args.storage}: nothing deleted: {report.deferred}; run gc again later")
    else:
        print(f"storage {args.storage}: {report.deleted} unused chunk(s) deleted ({_mib(report.deleted_bytes)}); "
              f"{report.referenced} in use")
    return EXIT_OK


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"
