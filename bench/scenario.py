"""The measurements, in the order one run makes them.

Each repeat starts a new chain on every target, so repeats are alike:

    bare cp+fsync | bare push-mode backup | bare upload | full -> nfs | full -> s3 |
    dirty the guest | incremental -> nfs | restore latest (nfs) | bare restore (nfs) |
    incremental -> s3 | restore latest (s3) | bare restores (s3: ranged, single GET)

The format-2 targets ``vault`` (a local directory) and ``vault-s3`` (the S3 endpoint,
prefix ``vault``), chunked, compressed and encrypted, get a second full right after their
first, which the planner chooses: the first full's checkpoint (with its bitmap) is
deleted, as when a domain is redefined or its bitmaps are lost (data unchanged: what a
lost bitmap costs). The restore of ``vault`` is compared
with a bare ``qemu-img convert`` of the guest's live image, which holds the same data at
that moment; the restore of ``vault-s3`` with a bare parallel download of the same bytes
(every chunk object the point uses, GET by as many threads as the target's
``chunk_concurrency``, each written at its place in a file, then fsync). Their points are
deleted and their chunks collected at the end of each repeat.

With virtnbdbackup installed (``bench/peer.py``), each repeat also runs its full of a
twin guest (same size, data layout and dirtied pieces) right after virtwarden's fulls,
its incremental after virtwarden's incrementals and restores, and ``virtnbdrestore`` of
that incremental's state, timed as whole commands like the bare steps.

``restore --point latest`` takes the newest point of any target, so each target's
restore follows its own incremental. The page cache is dropped before every timed step
when the kernel allows it, so no step reads what the previous one left in memory.
"""
from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from virtwarden.storage_backends.nfs import NfsBackend
from virtwarden.storage_backends.repository import Repository

from bench import bare, host
from bench.bare import BareS3
from bench.guest import BenchGuest, Dirtied
from bench.peer import Peer
from bench.product import VAULT_S3_PREFIX, Installation, JobRun
from bench.stats import Series, timed
from virtwarden.config import NfsStorage

DISK = "vda"
VAULTS = ("vault", "vault-s3")  # the format-2 targets
Point = dict[str, Any]  # a restore point as ``virtwarden backups --json`` lists it


@dataclass
class Results:
    series: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str, unit: str = "s") -> Series:
        return self.series.setdefault(name, Series(unit))

    def job(self, name: str, run: JobRun) -> None:
        """Record a job's timings (``name``, ``name.cli``) and its worker memory."""
        self.get(name).add(run.job_seconds)
        self.get(f"{name}.cli").add(run.cli_seconds)
        self.get(f"{name}.rss", "B").add(run.peak_rss)
        self.get("worker.idle_rss", "B").add(run.idle_rss)


@dataclass
class Bench:
    inst: Installation
    guest: BenchGuest
    s3: BareS3 | None
    targets: list[str]
    scratch: Path  # for the bare operations' files, on the same filesystem as the product's
    drop_caches: bool
    rng: random.Random
    data_bytes: int  # --data-gib in bytes: the guest's filled region
    dirty_bytes: int  # --dirty-mib in bytes
    peer: Peer | None = None  # virtnbdbackup, when installed
    results: Results = field(default_factory=Results)

    def cold(self) -> None:
        if self.drop_caches:
            host.drop_caches()

    def timed_bare(self, name: str, step: Callable[[], object]) -> None:
        self.cold()
        with timed(self.results.get(name)):
            step()

    def job(self, name: str, *args: str) -> JobRun:
        self.cold()
        run = self.inst.run_job(*args)
        self.results.job(name, run)
        return run

    # --- one repeat --------------------------------------------------------------
    def repeat(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.results.get("load.1min", "").add(host.load1())
        self.results.get("image.actual_size", "B").add(host.actual_size(self.guest.image))
        fulls = self._fulls()
        if self.peer is not None:
            self.timed_bare("full.peer", self.peer.full)
            self.results.get("full.peer.stored", "B").add(self.peer.stored("*.full.data"))
        before = self.rng.getstate()
        self._record_dirtied(self.guest.dirty(self.dirty_bytes, self.data_bytes, self.rng))
        if self.peer is not None:  # the same pieces at the same offsets in its twin
            twin_rng = random.Random()
            twin_rng.setstate(before)
            self.peer.dirty(self.dirty_bytes, self.data_bytes, twin_rng)
        for target in self.targets:
            inc = self._backup(target, "incremental")
            self._restore(target, fulls[target], inc)
        if self.peer is not None:  # the guest has not written since it was dirtied
            self.timed_bare("incremental.peer", self.peer.incremental)
            self.results.get("incremental.peer.stored", "B").add(self.peer.stored("*.inc.*.data"))
            out = self.scratch / "restored-peer"
            self.timed_bare("restore.peer", partial(self.peer.restore, out))
            shutil.rmtree(out)
        self._forget_stored()

    def _fulls(self) -> dict[str, Point]:
        """The bare copies, then a full backup to each target; target -> its point."""
        image_copy = self.scratch / "image-copy.qcow2"
        self.timed_bare("full.nfs.bare", partial(bare.copy_fsync, self.guest.image, image_copy))
        self._push_then_publish()
        fulls: dict[str, Point] = {}
        if self.s3 is not None:  # the bare side of both S3 targets' fulls
            self.timed_bare("full.s3.bare", partial(self.s3.upload, image_copy, "bare/image-copy.qcow2"))
            self.s3.delete_prefix("bare/")
        for target in self.targets:
            fulls[target] = self._backup(target, "full")
            if target in VAULTS:  # a lost bitmap: everything read again, only what is new is stored
                self.guest.lose_checkpoint(fulls[target]["checkpoint"])
                self._backup(target, "full", name="full2", ask=False)
        image_copy.unlink()
        return fulls

    def _push_then_publish(self) -> None:
        """The two halves of a full backup to NFS, timed apart: a bare libvirt push-mode
        backup (+ fsync) into the place the NFS backend stages an image, then the
        product's own publish step on it (SHA-256 read, fsync, rename), right after, as
        the job does, with the image still in the page cache."""
        assert self.guest.dom is not None
        repo = self.scratch / "push-probe"
        repo.mkdir()
        backend = NfsBackend("push-probe", NfsStorage(type="nfs", path=str(repo)))
        key = f"x/{DISK}.qcow2"
        staged = backend.stage(key)
        self.timed_bare("full.push.bare", partial(bare.push_backup, self.guest.dom, DISK, staged))
        with timed(self.results.get("full.nfs.publish_only")):
            backend.publish_staged(key, staged)
        shutil.rmtree(repo)

    def _record_dirtied(self, d: Dirtied) -> None:
        self.results.get("dirtied", "B").add(d.bytes)
        self.results.get("dirtied.clusters", "B").add(d.cluster_bytes)

    def _backup(self, target: str, level: str, name: str | None = None, *, ask: bool = True) -> Point:
        """A backup of ``level`` to ``target``; a full is asked for (``--full``) unless
        ``ask`` is false (then the planner must choose one)."""
        args = ["backup", self.guest.name, "--target", target] + (["--full"] if level == "full" and ask else [])
        name = name or level
        run = self.job(f"{name}.{target}", *args)
        if run.job["result"]["level"] != level:
            raise RuntimeError(f"expected a {level} backup, got {run.job['result']}")
        point = next(p for p in self.inst.points(self.guest.name) if p["id"] == run.job["result"]["point_id"])
        # format 1: the point's images; format 2: the bytes its backup stored anew
        self.results.get(f"{name}.{target}.stored", "B").add(point["size_bytes"])
        return {**point, "checkpoint": run.job["result"].get("checkpoint")}

    def _restore(self, target: str, full: Point, inc: Point) -> None:
        out = self.scratch / f"restored-{target}"
        self.job(f"restore.{target}", "restore", self.guest.name, "--point", "latest", "--to-dir", str(out))
        shutil.rmtree(out)
        keys = [Repository.point_prefix(self.guest.name, p["chain_id"], p["id"]) + f"{DISK}.qcow2"
                for p in (full, inc)]
        bare_out, work = self.scratch / "bare-restored.qcow2", self.scratch / "bare-restore"
        steps: dict[str, Callable[[], object]] = {}
        if target == "vault":  # the live image holds the latest point's data until the guest writes again
            steps["restore.vault.bare"] = partial(bare.convert_live, self.guest.image, bare_out)
        elif target == "vault-s3":
            assert self.s3 is not None
            chunks = self._chunk_objects(target, inc)  # read before the clock starts, as a restore plans
            steps["restore.vault-s3.bare"] = partial(self.s3.download_parallel, chunks, bare_out)
        elif target == "nfs":
            full_path, inc_path = (self.inst.repository / k for k in keys)
            steps["restore.nfs.bare"] = partial(bare.restore_from_dir, full_path, inc_path, work, bare_out)
        else:
            assert self.s3 is not None
            full_key, inc_key = (f"{self.inst.s3['prefix']}/{k}" for k in keys)
            restore = partial(self.s3.restore, full_key, inc_key, work, bare_out)
            steps["restore.s3.bare"] = partial(restore, ranged=True)
            steps["restore.s3.bare_get"] = partial(restore, ranged=False)
        for name, step in steps.items():
            self.timed_bare(name, step)
            bare_out.unlink()
            shutil.rmtree(work, ignore_errors=True)

    def _chunk_objects(self, target: str, point: Point) -> list[tuple[int, str]]:
        """(offset in the disk, object key) of every chunk the point's disk uses."""
        repo = self.inst.open_vault(target)
        ref = repo.ref(self.guest.name, point["id"])
        index = next(i for i in repo.indexes(ref) if i.target == DISK)
        return [(offset, f"{VAULT_S3_PREFIX}/{repo.chunks.key(cid)}") for offset, _length, cid in index.pieces()
                if cid is not None]

    def _forget_stored(self) -> None:
        """Drop this repeat's chains from storage (the next repeat starts new ones), so the
        repository and the S3 endpoint do not grow with --repeat."""
        shutil.rmtree(self.inst.repository / self.guest.name, ignore_errors=True)
        if self.s3 is not None:
            self.s3.delete_prefix(f"{self.inst.s3['prefix']}/")
        for target in VAULTS:
            if target in self.targets:
                self.inst.empty_vault(target)
        if self.peer is not None:
            self.peer.forget()

    # --- memory in the disk size --------------------------------------------------
    def full_peak_rss(self, guest: BenchGuest, label: str) -> None:
        """One full backup of ``guest`` to each target, for its worker memory only."""
        for target in self.targets:
            self.cold()
            run = self.inst.run_job("backup", guest.name, "--target", target, "--full")
            self.results.get(f"memcheck.{label}.{target}.rss", "B").add(run.peak_rss)
            self.results.get(f"memcheck.{label}.{target}", "s").add(run.job_seconds)
        shutil.rmtree(self.inst.repository / guest.name, ignore_errors=True)
        if self.s3 is not None:
            self.s3.delete_prefix(f"{self.inst.s3['prefix']}/")
        for target in VAULTS:
            if target in self.targets:
                self.inst.empty_vault(target)
