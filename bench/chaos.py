"""``python -m bench.chaos --cycles N``: backups, prunes and restores under real faults.

Several OS-less guests on the two test hosts (the main libvirtd and scripts/testhost.sh's
host2, with shared storage), both strategies (bitmap and blockcommit), a PostgreSQL
catalog schema of the run's own, a private Redis broker (it keeps nothing on disk, so
stopping it loses every message it held) and two ``virtwarden worker`` processes per host
with the short leases of the tests. Each cycle writes known bytes into one guest, starts a
backup, a prune or a restore of it, and injects one fault while the job runs:

- ``kill``: SIGKILL one worker serving the job's host (restarted a second later);
- ``stop``: SIGSTOP it past its lease (another worker takes over), then SIGCONT;
- ``host2``: restart host2's libvirtd (only when the guest is there);
- ``redis``: stop the broker for a few seconds, then start it empty;
- ``none``.

A worker that exits (a broker outage is fatal to Celery) is started again, as systemd's
``Restart=always`` does. Every backup records which bytes the guest held, so at the end
every complete point is restored and compared with exactly those bytes. It prints cycles,
faults, jobs by outcome, jobs lost (not finished 5 minutes after their fault ended),
points verified restorable and unrestorable, and leftovers: points still ``writing``,
stored files of no complete point, scratch files, libvirt jobs, checkpoints the catalog
does not know, and overlays still on a guest's disks.

``--format2`` makes the storage target a format-2 repository (chunks, compressed,
encrypted; restores read over NBD, shut-off reads through qemu-nbd): after the run a gc
must leave only complete points' manifests and indexes and the chunks they name.

Needs root, the running test bed (``bash scripts/testhost.sh``) and its environment
(``set -a; . .testhost/env; set +a``). Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import libvirt
import sqlalchemy
import yaml

from bench.run import _interrupted, _quietly, say
from tests.faults import PrivateRedis
from tests.fleet import HOST2_URI, restart_host2, stop_host2_libvirtd
from tests.guests import Guest, GuestFactory, GuestIOError, images_equal
from tests.harness import FAST_KDF, PG_URL, TEST_WORKER, Installation

MiB = 1 << 20
HOST2_LOGS = Path("/var/lib/virtwarden-testhost/host2/log/qemu")
URIS = {"local": "qemu:///system", "host2": HOST2_URI}
FAULTS = ("kill", "stop", "host2", "redis", "none")
LOST_AFTER = 300.0  # seconds after its fault ended that an unfinished job counts as lost


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--guests", type=int, default=3, help="guests (the first on host2, the second blockcommit)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=4, help="retention of the prune jobs")
    p.add_argument("--json", action="store_true", help="print the figures as JSON as well")
    p.add_argument("--format2", action="store_true",
                   help="the storage target in repository format 2 (chunks, encrypted); gc jobs every 20 s at most")
    return p.parse_args(argv)


class Chaos:
    def __init__(self, root: Path, args: argparse.Namespace, stack: ExitStack) -> None:
        self.root = root
        self.args = args
        self.rng = random.Random(args.seed)
        self.stack = stack
        self.counts: Counter[str] = Counter()
        self.expected: dict[str, Path] = {}  # backup job id -> directory of the raw images it must hold
        self.guest_of: dict[str, Guest] = {}  # domain -> its guest
        self.host_of: dict[str, str] = {}
        self.unfinished: dict[str, float] = {}  # job id -> when its fault ended
        self.problems: list[str] = []

    # --- set-up ------------------------------------------------------------------------
    def setup(self) -> None:
        if not HOST2_URI:
            raise SystemExit("VIRTWARDEN_TEST_HOST2_URI is not set: run scripts/testhost.sh and source .testhost/env")
        self.redis = PrivateRedis(self.root / "redis")
        self.redis.start()
        self.stack.callback(_quietly("stop the broker", self.redis.stop))
        engine = sqlalchemy.create_engine(PG_URL)
        schema = f"vw_chaos_{secrets.token_hex(4)}"
        with engine.begin() as c:
            c.exec_driver_sql(f"CREATE SCHEMA {schema}")

        def drop() -> None:
            with engine.begin() as c:
                c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            engine.dispose()

        self.stack.callback(_quietly("drop the catalog schema", drop))
        sep = "&" if "?" in PG_URL else "?"
        self.vw = Installation(self.root / "vw")
        self.vw.root.mkdir()
        self.vw.storage["nfs"] = {"type": "nfs", "path": str(self.root / "repository"), "create": True}
        if self.args.format2:
            secret = self.root / "secrets"
            secret.mkdir(mode=0o700)
            (secret / "pass").write_text("chaos passphrase\n")
            self.vw.storage["nfs"].update(format=2, key_file=str(secret / "nfs.key"),
                                          passphrase_file=str(secret / "pass"))
        self.vw.hosts = {name: {"uri": uri, "group": "rack1", "shared_storage": True} for name, uri in URIS.items()}
        self.vw.extra.update(database_url=f"{PG_URL}{sep}options=-csearch_path%3D{schema}",
                             broker_url=self.redis.url, policy_dir=str(self.root / "policies"))
        self.vw.extra["worker"] = {**TEST_WORKER, "max_attempts": 5}
        if self.args.format2:  # gc runs by itself after prunes and failures: often here, under the same faults
            self.vw.extra["worker"]["gc_seconds"] = 20
        # Restores are submitted as the API submits them: confined, and judged again by
        # the worker that runs them (also when a killed attempt's retry resumes one).
        self.vw.extra["restore"] = {"allowed_dirs": [str(self.root / "restores"), str(self.root / "verify")]}
        self.factory = GuestFactory(URIS["local"], self.root / "guests")
        self.stack.callback(_quietly("remove the guests", self.factory.close))
        for i in range(self.args.guests):
            g = self.factory(disks=2 if i == 0 else 1, size_mib=64, name=f"chaos-{i}-{secrets.token_hex(3)}")
            self.guest_of[g.name] = g
            self.host_of[g.name] = "local"
        self._policies()
        self.vw.write_config()
        if self.args.format2:
            made = self.vw.cli("key", "init", "nfs", "--chunk-size-kib", "256", *FAST_KDF)
            if made.code != 0:
                raise SystemExit(f"virtwarden key init failed: {made.err}")
        self.stack.callback(_quietly("stop the workers", self.vw.close))
        self.workers = {h: [self.vw.start_worker([h]), self.vw.start_worker([h])] for h in URIS}
        first = next(iter(self.guest_of.values()))
        self._move_to_host2(first)
        self.cat = self.vw.catalog()
        self.stack.callback(_quietly("close the catalog", self.cat.close))
        from virtwarden.worker import celery_app

        from virtwarden import config as config_module

        self.cfg = config_module.load(str(self.vw.config_path), env={})
        celery_app.configure(self.cfg)

    def _policies(self) -> None:
        pdir = self.root / "policies"
        pdir.mkdir()
        names = list(self.guest_of)
        docs = []
        for strategy, domains in (("bitmap", [n for i, n in enumerate(names) if i != 1]), ("blockcommit", names[1:2])):
            docs.append({"apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": strategy},
                         "spec": {"selector": {"domains": domains},
                                  "backup": {"target": "nfs", "strategy": strategy, "full_every": 6,
                                             "retention": {"keep_last": self.args.keep_last}}}})
        (pdir / "chaos.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self.policy_of = {n: ("blockcommit" if i == 1 else "bitmap") for i, n in enumerate(names)}

    def _move_to_host2(self, g) -> None:
        from virtwarden.hypervisor.libvirt_host import LibvirtHost
        from virtwarden.hypervisor.migrate import migrate

        with LibvirtHost("local", URIS["local"]) as s, LibvirtHost("host2", URIS["host2"]) as d:
            migrate(s, d, g.name, timeout=120, unsafe=True)
        self._rebind(g, "host2")

    def _rebind(self, g, host: str) -> None:
        g.conn = libvirt.open(URIS[host])
        g.dom = g.conn.lookupByName(g.name)
        g.log_dir = HOST2_LOGS if host == "host2" else Path("/var/log/libvirt/qemu")
        self.host_of[g.name] = host

    # --- one cycle ---------------------------------------------------------------------
    def cycle(self, n: int) -> None:
        name = self.rng.choice(list(self.guest_of))
        action = self.rng.choices(["backup", "full", "prune", "restore"], weights=[62, 8, 12, 18])[0]
        faults = [f for f in FAULTS if f != "host2" or self.host_of[name] == "host2"]
        fault = self.rng.choice(faults)
        job = self._submit(name, action)
        if job is None:
            self.counts[f"action {action} skipped"] += 1
            return
        self.counts[f"action {action}"] += 1
        self.counts[f"fault {fault}"] += 1
        self._wait_running(job.id, timeout=60)
        time.sleep(self.rng.uniform(0.2, 3.0))
        self._inject(fault, self.host_of[name], job.id)
        self.unfinished[job.id] = time.monotonic()
        self._settle(job.id, timeout=240)
        say(f"cycle {n}: {action} of {name} ({self.host_of[name]}) with fault {fault}: "
            f"{self._state(job.id)}")

    def _submit(self, name: str, action: str):
        from virtwarden.catalog import points

        from virtwarden import submit

        g = self.guest_of[name]
        if action in ("backup", "full"):
            self._wait_idle(name)
            try:
                for target in g.disks:
                    for _ in range(self.rng.randint(1, 4)):
                        length = self.rng.choice([64 << 10, 256 << 10, 1 << 20])
                        g.write_random(target, self.rng.randrange(0, g.size - length, 4096), length)
            except GuestIOError as e:
                # The write may have happened without its report: take what the disks hold now.
                self.problems.append(f"{name}: {e}; its reference copy was read again from its disks")
                self._resync(g)
            job = submit.submit(self.cfg, self.cat, "backup", name, policy=self.policy_of[name],
                                full=action == "full", requested_by="chaos")
            snap = self.root / "expected" / job.id
            snap.mkdir(parents=True)
            for target in g.disks:
                g.shadow_copy(target, snap / f"{target}.raw")
            self.expected[job.id] = snap
            return job
        usable = [p for p in points.for_domain(self.cat, name) if p.usable]
        if not usable:
            return None
        if action == "prune":
            return submit.submit(self.cfg, self.cat, "prune", name, policy=self.policy_of[name],
                                 requested_by="chaos")
        point = self.rng.choice(usable)
        dest = self.root / "restores" / secrets.token_hex(4)
        job = submit.submit(self.cfg, self.cat, "restore", name, point=point.id, to_dir=str(dest),
                            requested_by="chaos")
        self.restore_of = getattr(self, "restore_of", {})
        self.restore_of[job.id] = (point, dest)
        return job

    def _victim(self, host: str, job_id: str):
        """Mostly the worker whose process holds the job's lease, else either of the host's."""
        from virtwarden.catalog import jobs

        from tests.faults import parent_of, process_of

        owner = jobs.get(self.cat, job_id).lease_owner
        if owner and self.rng.random() < 0.8:
            try:
                pid = process_of(owner)
                pids = {pid, parent_of(pid)}
            except (OSError, ValueError, IndexError):
                pids = set()
            for w in self.workers[host]:
                if w.proc.pid in pids:
                    return w
        return self.rng.choice(self.workers[host])

    @staticmethod
    def _resync(g: Guest) -> None:
        for disk in ET.fromstring(g.xml()).iterfind("devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            assert source is not None and target is not None, "the bench's guests define both"
            top, dev = source.get("file"), target.get("dev")
            assert top is not None and dev is not None, "the bench's guests run on files, with names"
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", top, str(g.shadows[dev])], check=True)

    def _inject(self, fault: str, host: str, job_id: str) -> None:
        if fault == "kill":
            w = self._victim(host, job_id)
            w.kill()
            time.sleep(1)
            self._replace(host, w)
        elif fault == "stop":
            w = self._victim(host, job_id)
            w.pause()
            time.sleep(TEST_WORKER["lease_seconds"] + self.rng.uniform(2, 6))
            w.resume()
        elif fault == "host2":
            stop_host2_libvirtd()
            time.sleep(self.rng.uniform(0.5, 3))
            restart_host2(libvirt, URIS["host2"])
            for g in self.guest_of.values():
                if self.host_of[g.name] == "host2":
                    self._rebind(g, "host2")
        elif fault == "redis":
            self.redis.stop()
            time.sleep(self.rng.uniform(2, 8))
            self.redis.start()
        self._supervise()

    def _replace(self, host: str, w) -> None:
        self.workers[host].remove(w)
        w.stop()
        self.workers[host].append(self.vw.start_worker([host]))
        self.counts["worker restarts"] += 1

    def _supervise(self) -> None:
        """Start again every worker that exited (Restart=always)."""
        for host, ws in self.workers.items():
            for w in list(ws):
                if w.proc.poll() is not None:
                    self._replace(host, w)

    def _state(self, job_id: str) -> str:
        from virtwarden.catalog import jobs

        return jobs.get(self.cat, job_id).state

    def _wait_running(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._state(job_id) == "queued" and time.monotonic() < deadline:
            time.sleep(0.1)

    def _settle(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._supervise()
            if self._state(job_id) in ("succeeded", "failed"):
                self.unfinished.pop(job_id, None)
                return
            time.sleep(0.5)

    def _wait_idle(self, name: str) -> None:
        """No write while an earlier job of the domain may still read its disks."""
        from virtwarden.catalog import jobs

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not any(j.state in ("queued", "running") for j in jobs.recent(self.cat, limit=50, domain=name)):
                return
            self._supervise()
            time.sleep(0.5)

    # --- the verdict --------------------------------------------------------------------
    def finish(self) -> dict:
        from virtwarden.catalog import jobs

        for job_id in list(self.unfinished):
            self._settle(job_id, timeout=max(0.0, self.unfinished.get(job_id, 0) + LOST_AFTER - time.monotonic()))
        lost = sorted(self.unfinished)
        all_jobs = [j for name in self.guest_of for j in jobs.recent(self.cat, limit=100000, domain=name)]
        outcomes = Counter(f"{j.kind} {j.state}" for j in all_jobs if j.requested_by == "chaos")
        outcomes.update(f"gc {j.state}" for j in self._settled_gc())
        restorable, unrestorable = self._verify_points()
        leftovers = self._leftovers()
        return {"cycles": self.args.cycles,
                "faults": {k[6:]: v for k, v in self.counts.items() if k.startswith("fault ")},
                "actions": {k[7:]: v for k, v in self.counts.items() if k.startswith("action ")},
                "worker_restarts": self.counts["worker restarts"], "jobs": dict(sorted(outcomes.items())),
                "jobs_lost": len(lost), "lost": lost, "points_restorable": restorable,
                "points_unrestorable": len(unrestorable), "unrestorable": unrestorable,
                "leftovers": len(leftovers), "leftover": leftovers, "problems": self.problems}

    def _settled_gc(self) -> list:
        """The gc jobs the workers' sweeps submitted, once none is queued or running (the
        leftover check runs a gc of its own, which would defer beside one)."""
        from virtwarden.catalog import jobs

        def gc_jobs() -> list:
            return [j for j in jobs.recent(self.cat, limit=100000) if j.kind == "gc"]

        deadline = time.monotonic() + LOST_AFTER
        while any(not j.finished for j in gc_jobs()) and time.monotonic() < deadline:
            time.sleep(1)
        found = gc_jobs()
        self.problems += [f"gc job {j.id} still {j.state}" for j in found if not j.finished]
        return found

    def _verify_points(self) -> tuple[int, list[str]]:
        from virtwarden.catalog import points

        from virtwarden import submit

        ok, bad = 0, []
        for name in self.guest_of:
            for p in points.for_domain(self.cat, name):
                if not p.usable:
                    continue
                snap = self.expected.get(p.job_id or "")
                if snap is None:
                    bad.append(f"{p.id}: made by job {p.job_id} that the run did not start")
                    continue
                dest = self.root / "verify" / p.id
                job = submit.submit(self.cfg, self.cat, "restore", name, point=p.id, to_dir=str(dest),
                                    requested_by="verify")
                self._settle(job.id, timeout=300)
                done = jobs_get(self.cat, job.id)
                if done.state != "succeeded":
                    bad.append(f"{p.id}: restore {done.state}: {done.error}")
                    continue
                differ = [t for t in (x.stem for x in snap.glob("*.raw"))
                          if not images_equal(dest / f"{t}.qcow2", snap / f"{t}.raw")]
                if differ:
                    bad.append(f"{p.id} ({p.level}, {p.strategy}): {', '.join(differ)} differ from what the guest held")
                else:
                    ok += 1
                shutil.rmtree(dest, ignore_errors=True)
        return ok, bad

    def _format2_leftovers(self, repo: Path, complete: dict) -> list[str]:
        """Format 2: after a gc, every point directory is a complete point's, every chunk
        is named by some index, and nothing else (temporary files, markers) is left."""
        found = []
        gc = self.vw.cli("storage", "gc", "nfs", "--json")
        if gc.code != 0:
            return [f"storage gc failed: {gc.err.strip()}"]
        from virtwarden.storage_backends.format2.access import open_repository

        opened = open_repository("nfs", self.cfg.storage_target("nfs"))
        named: set[str] = set()
        for manifest_path in repo.glob("points/*/*/manifest"):
            point_id = manifest_path.parent.name
            if point_id not in complete:
                found.append(f"point {point_id} in storage is no complete point of the catalog")
                continue
            domain = complete[point_id].domain
            for index in opened.indexes(opened.ref(domain, point_id)):
                named |= index.referenced()
        for path in repo.rglob("*"):
            rel = path.relative_to(repo)
            if not path.is_file() or str(rel) == "format2/config":
                continue
            if rel.parts[0] == "chunks" and path.name not in named:
                found.append(f"chunk {path.name} that no index names (after gc)")
            elif rel.parts[0] not in ("chunks", "points"):
                found.append(f"stored file {rel} (a marker or temporary file)")
            elif rel.parts[0] == "points" and rel.parts[2] not in complete:
                found.append(f"stored file {rel} of no complete point")
        return found

    def _leftovers(self) -> list[str]:
        from virtwarden.catalog import points

        found = []
        complete = {}
        for name in self.guest_of:
            for p in points.for_domain(self.cat, name):
                if p.status == "writing":
                    found.append(f"point {p.id} of {name} still writing")
                if p.usable:
                    complete[p.id] = p
        repo = self.root / "repository"
        if self.args.format2:
            found += self._format2_leftovers(repo, complete)
        else:
            for path in repo.rglob("*"):
                if path.is_file():
                    rel = path.relative_to(repo).parts
                    if len(rel) != 4 or rel[2] not in complete:
                        found.append(f"stored file {path.relative_to(repo)} of no complete point")
        scratch = self.vw.scratch
        for path in scratch.rglob("*") if scratch.exists() else []:
            if path.is_file():
                found.append(f"scratch file {path.relative_to(scratch)}")
        for name, g in self.guest_of.items():
            host = self.host_of[name]
            conn = libvirt.open(URIS[host])
            try:
                dom = conn.lookupByName(name)
                if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                    found.append(f"{name}: a libvirt job still runs on {host}")
                known = points.checkpoints_of(self.cat, dom.UUIDString(), ("complete",))
                for cp in dom.listAllCheckpoints():
                    if cp.getName() not in known:
                        found.append(f"{name}: checkpoint {cp.getName()} the catalog does not list as complete")
                live = set()
                for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk"):
                    target_el = disk.find("target")
                    assert target_el is not None, "the bench's guests define a target for every disk"
                    target = target_el.get("dev", "")
                    chain = [Path(f) for s in disk.iter("source") if (f := s.get("file"))]
                    live.update(chain)
                    # A blockcommit domain runs on one change-tracking overlay between runs.
                    tracked = len(chain) == 2 and ".virtwarden-" in chain[0].name
                    if chain[-1:] != [g.disks[target]] or not (len(chain) == 1 or tracked):
                        found.append(f"{name}: {target} runs on {' <- '.join(map(str, reversed(chain)))}")
            finally:
                conn.close()
            for path in g.workdir.iterdir():
                if path.suffix == ".qcow2" and path not in live:
                    found.append(f"{name}: overlay file {path.name} left beside its disks")
        return found


def jobs_get(cat, job_id: str):
    from virtwarden.catalog import jobs

    return jobs.get(cat, job_id)


def report(figures: dict) -> str:
    lines = [f"cycles              {figures['cycles']}",
             "faults              " + ", ".join(f"{k} {v}" for k, v in sorted(figures["faults"].items())),
             "actions             " + ", ".join(f"{k} {v}" for k, v in sorted(figures["actions"].items())),
             f"worker restarts     {figures['worker_restarts']}",
             "jobs                " + ", ".join(f"{k} {v}" for k, v in figures["jobs"].items()),
             f"jobs lost           {figures['jobs_lost']}",
             f"points restorable   {figures['points_restorable']}",
             f"points unrestorable {figures['points_unrestorable']}",
             f"leftovers           {figures['leftovers']}"]
    for key in ("lost", "unrestorable", "leftover", "problems"):
        lines += [f"  {key}: {item}" for item in figures[key]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (the guests' disks and host2's libvirtd need it)")
    signal.signal(signal.SIGTERM, _interrupted)
    start = time.monotonic()
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="virtwarden-chaos-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, root, True)
        chaos = Chaos(root, args, stack)
        say(f"setting up in {root}")
        chaos.setup()
        for n in range(1, args.cycles + 1):
            try:
                chaos.cycle(n)
            except Exception as e:  # noqa: BLE001 - a harness problem is reported, the run goes on
                chaos.problems.append(f"cycle {n}: {type(e).__name__}: {e}")
                say(f"cycle {n}: {type(e).__name__}: {e}")
                chaos._supervise()
        say("all cycles done: waiting for unfinished jobs, then restoring every complete point")
        figures = chaos.finish()
        figures["minutes"] = round((time.monotonic() - start) / 60, 1)
    print(report(figures) + f"\nminutes             {figures['minutes']}")
    if args.json:
        print(json.dumps(figures, indent=2))
    bad = figures["jobs_lost"] or figures["points_unrestorable"] or figures["leftovers"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
