"""The ``evacuate`` job: live-migrate every running domain off one host.

1. Close what an earlier attempt of this job left open (its worker died): a migration
   row still ``planned`` or ``running`` is ``succeeded`` when the domain runs on its
   target now, else ``failed``.
2. Ask every configured host what it has now (reachable or not, free memory, CPUs,
   running domains; recorded in ``hosts``), and plan with the pure
   ``policies.placement.plan_evacuation``. The plan is made here, when the job runs,
   not when it was queued: capacity is what it is now.
3. Record one ``migrations`` row per running domain: ``planned`` with its target, or
   ``skipped`` with the reason it cannot move.
4. Migrate at most ``max_parallel`` at a time, each in its own thread with its own
   connections to both hosts, under the domain's lock (so no backup or other
   disk-changing job runs on it meanwhile), bounded by its policy's timeout (aborted
   when it passes, the domain then keeps running where it was). A failed migration
   does not stop the others. Each success moves the domain's row in ``domains`` to
   its new host.

Outcome: the job succeeds when no running domain is left on the host; otherwise it
fails, and its error lists every domain left and why (the ``migrations`` rows hold the
same per domain), so an on-call ``evacuate --wait`` exits non-zero while guests remain
on a host that is meant to be empty.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from virtwarden.catalog import events, jobs, moves
from virtwarden.catalog.events import KnownDomain
from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor import connect as connect_libvirt
from virtwarden.hypervisor.migrate import Capacity, Progress, capacity, migrate, running_here
from virtwarden.hypervisor.types import Connect, Hypervisor
from virtwarden.policies.placement import Candidate, HostState, Move, Plan, plan_evacuation
from virtwarden.tasks.context import JobContext

from virtwarden.errors import JobFailed, VirtwardenError

log = logging.getLogger(__name__)
MiB = 1024 * 1024
DEFAULT_TIMEOUT = 600  # seconds per migration when no policy says
REPORT_SECONDS = 0.5


@dataclass(frozen=True)
class EvacuateRequest:
    host: str
    # Every configured host: name -> {"uri", "group", "shared_storage", "memory_reserve_mib",
    # "migration_bandwidth_mib"}.
    hosts: dict[str, dict]
    to: list[str] = field(default_factory=list)  # only these targets (--to); empty: any
    max_parallel: int = 2
    # Per domain, from its governing migration policy when it was submitted:
    # {"policy", "targets": [globs] or None, "timeout": seconds} or {"refused": reason}.
    domains: dict[str, dict] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT


# --- survey and plan (also used by the dry run) -------------------------------------------------
@dataclass(frozen=True)
class Survey:
    hosts: list[HostState]
    candidates: list[Candidate]
    capacities: dict[str, Capacity]


def survey(req: EvacuateRequest, cat: Catalog | None = None, connect: Connect = connect_libvirt) -> Survey:
    """What every configured host says now. The source must answer (a host that cannot
    be reached cannot be drained live); other hosts that do not answer are down.
    With ``cat``, each host's state and capacity is recorded in ``hosts``. Hosts are
    opened with ``connect`` (the job's ``JobContext.connect``)."""
    states, caps = [], {}
    for name, h in sorted(req.hosts.items()):
        reserve = int(h.get("memory_reserve_mib", 0)) * MiB
        try:
            with connect(name, h["uri"]) as hv:
                cap = capacity(hv)
        except VirtwardenError as e:
            if name == req.host:
                raise
            states.append(HostState(name, h["group"], bool(h["shared_storage"]), False, error=str(e)))
            if cat is not None:
                moves.note_host(cat, name, uri=h["uri"], group=h["group"], up=False, error=str(e))
            continue
        caps[name] = cap
        states.append(HostState(name, h["group"], bool(h["shared_storage"]), True, cpus=cap.cpus,
                                memory_free=cap.memory_free, memory_reserve=reserve,
                                vcpus_used=sum(g.vcpus for g in cap.running)))
        if cat is not None:
            moves.note_host(cat, name, uri=h["uri"], group=h["group"], up=True, capacity=cap.to_json())
    candidates = []
    for g in caps[req.host].guests:
        s = req.domains.get(g.name, {})
        targets = s.get("targets")
        candidates.append(Candidate(g.name, g.uuid, g.running, g.memory, g.vcpus,
                                    tuple(targets) if targets is not None else None, s.get("policy"),
                                    s.get("refused")))
    return Survey(states, candidates, caps)


def plan(req: EvacuateRequest, cat: Catalog | None = None, connect: Connect = connect_libvirt) -> Plan:
    found = survey(req, cat, connect)
    return plan_evacuation(req.host, found.hosts, found.candidates, to=req.to)


# --- the job ------------------------------------------------------------------------------------
def run_evacuate(ctx: JobContext, req: EvacuateRequest) -> dict:
    _close_earlier_attempts(ctx, req)
    found = plan(req, ctx.catalog, ctx.connect)
    rows = {}
    for m in found.moves:
        rows[m.domain] = moves.add(ctx.catalog, job_id=ctx.job_id, domain=m.domain, domain_uuid=m.uuid,
                                   from_host=req.host, to_host=m.to, outcome=moves.PLANNED).id
    for x in found.stuck:
        moves.add(ctx.catalog, job_id=ctx.job_id, domain=x.domain, domain_uuid=x.uuid, from_host=req.host,
                  to_host=None, outcome=moves.SKIPPED, reason=x.reason)
    log.info("job %s: evacuating %s: %d to move, %d cannot move", ctx.job_id, req.host, len(found.moves),
             len(found.stuck))
    done = _run_moves(ctx, req, found.moves, rows)
    return _outcome(req, found, done)


def _outcome(req: EvacuateRequest, found: Plan, done: list[dict]) -> dict:
    moved = [d for d in done if d["outcome"] == moves.SUCCEEDED]
    failed = [d for d in done if d["outcome"] != moves.SUCCEEDED]
    running = len(found.moves) + len(found.stuck)
    summary = f"{len(moved)} of {running} running domain(s) moved off {req.host}"
    left = [f"{d['domain']} ({d['reason']})" for d in failed] + [f"{x.domain} ({x.reason})" for x in found.stuck]
    if left:
        raise JobFailed(f"{summary}; still on {req.host}: " + "; ".join(left))
    return {"host": req.host, "summary": summary, "moved": moved,
            "not_running": [x.domain for x in found.left if not x.running]}


def _run_moves(ctx: JobContext, req: EvacuateRequest, planned: tuple[Move, ...], rows: dict[str, int]) -> list[dict]:
    """Migrate with at most ``max_parallel`` threads; report progress from this thread
    (whose report raises when the job's lease is lost: then every migration is
    aborted before the error goes on)."""
    if not planned:
        return []
    stop = threading.Event()
    status: dict[str, str] = {m.domain: "queued" for m in planned}
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, req.max_parallel), thread_name_prefix="evacuate") as pool:
        pending: set[Future] = {pool.submit(_move_one, ctx, req, m, rows[m.domain], status, stop) for m in planned}
        try:
            while pending:
                finished, pending = wait(pending, timeout=REPORT_SECONDS, return_when=FIRST_COMPLETED)
                results += [f.result() for f in finished]
                ctx.report(len(results) / len(planned), _progress_line(req, status, len(results), len(planned)))
        except BaseException:
            stop.set()
            wait(pending)
            raise
    return sorted(results, key=lambda r: r["domain"])


def _progress_line(req: EvacuateRequest, status: dict[str, str], done: int, total: int) -> str:
    busy = [f"{name} {text}" for name, text in sorted(status.items()) if text not in ("queued", "done")]
    return f"{done}/{total} off {req.host}" + (": " + "; ".join(busy) if busy else "")


def _move_one(ctx: JobContext, req: EvacuateRequest, m: Move, row: int, status: dict[str, str],
              stop: threading.Event) -> dict:
    timeout = float(req.domains.get(m.domain, {}).get("timeout") or req.timeout)
    src_cfg, dst_cfg = req.hosts[req.host], req.hosts[m.to]
    base = {"domain": m.domain, "uuid": m.uuid, "from": req.host, "to": m.to}
    try:
        _lock(ctx, m.domain, timeout, status, stop)
        try:
            with ctx.connect(req.host, src_cfg["uri"]) as src, ctx.connect(m.to, dst_cfg["uri"]) as dst:
                _wait_for_no_job(src, m.domain, timeout, status, stop)
                if not running_here(src, m.domain):
                    why = f"no longer running on {req.host} when its turn came"
                    moves.finish(ctx.catalog, row, moves.SKIPPED, reason=why)
                    return {**base, "outcome": moves.SKIPPED, "reason": why}
                moves.running(ctx.catalog, row)
                status[m.domain] = f"-> {m.to}"

                def seen(p: Progress) -> None:
                    status[m.domain] = f"-> {m.to} {p.fraction * 100:.0f}% ({p.remaining // MiB} MiB left)"

                out = migrate(src, dst, m.domain, timeout=timeout, unsafe=bool(src_cfg["shared_storage"]),
                              on_progress=seen, stop=stop, bandwidth_mib=src_cfg.get("migration_bandwidth_mib"))
        finally:
            jobs.unlock_domain(ctx.catalog, m.domain, ctx.job_id)
    except VirtwardenError as e:
        moves.finish(ctx.catalog, row, moves.FAILED, reason=str(e))
        status[m.domain] = "done"
        log.warning("job %s: domain %s was not moved to %s: %s", ctx.job_id, m.domain, m.to, e)
        return {**base, "outcome": moves.FAILED, "reason": str(e)}
    except BaseException as e:
        moves.finish(ctx.catalog, row, moves.FAILED, reason=f"internal error: {e!r}")
        raise
    moves.finish(ctx.catalog, row, moves.SUCCEEDED, downtime_ms=out.downtime_ms)
    events.note_domains(ctx.catalog, [KnownDomain(m.uuid, m.domain, m.to, "running")])
    status[m.domain] = "done"
    return {**base, "outcome": moves.SUCCEEDED, "seconds": round(out.elapsed_s, 1), "downtime_ms": out.downtime_ms}


def _lock(ctx: JobContext, domain: str, timeout: float, status: dict[str, str], stop: threading.Event) -> None:
    """Take the domain's lock, waiting (up to ``timeout``) for a backup or other
    disk-changing job that holds it to finish."""
    deadline = time.monotonic() + timeout
    while (holder := jobs.lock_domain(ctx.catalog, domain, ctx.job_id)) is not None:
        if time.monotonic() > deadline or stop.is_set():
            raise JobFailed(f"domain {domain!r} stayed busy with job {holder} (it holds the domain's lock)"
                            f" for {timeout:.0f} s")
        status[domain] = f"waiting for job {holder[:8]} to finish"
        stop.wait(1.0)


def _wait_for_no_job(hv: Hypervisor, domain: str, timeout: float, status: dict[str, str],
                     stop: threading.Event) -> None:
    """A libvirt job still active on the domain (a migration of a dead earlier attempt
    that libvirt has not cancelled yet) must end before a new migration can start."""
    deadline = time.monotonic() + timeout
    while running_here(hv, domain) and hv.has_active_job(domain):
        if time.monotonic() > deadline or stop.is_set():
            raise JobFailed(f"domain {domain!r} has had another libvirt job running for {timeout:.0f} s")
        status[domain] = "waiting for an earlier libvirt job to end"
        stop.wait(1.0)


def _close_earlier_attempts(ctx: JobContext, req: EvacuateRequest) -> None:
    for row in moves.open_for_job(ctx.catalog, ctx.job_id):
        target = req.hosts.get(row.to_host or "")
        arrived = False
        if target is not None:
            try:
                with ctx.connect(row.to_host or "", target["uri"]) as hv:
                    arrived = running_here(hv, row.domain)
            except VirtwardenError as e:
                log.warning("job %s: cannot check %s on %s: %s", ctx.job_id, row.domain, row.to_host, e)
        if arrived:
            moves.finish(ctx.catalog, row.id, moves.SUCCEEDED,
                         reason="finished while the worker that started it was lost")
            if row.domain_uuid:
                events.note_domains(ctx.catalog, [KnownDomain(row.domain_uuid, row.domain, row.to_host, "running")])
        else:
            moves.finish(ctx.catalog, row.id, moves.FAILED,
                         reason=f"attempt interrupted (worker lost); retried as attempt {ctx.attempt}")
