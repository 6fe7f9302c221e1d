"""Alertmanager webhooks: a host alert starts what the policies say (evacuate the host,
or back its domains up now), once.

``receive(cfg, cat, payload, actor)`` takes the webhook body (version 4) as parsed
JSON. For each alert:

- firing: the policies whose ``spec.migration.on_alerts`` name its ``alertname`` (and
  whose listed labels it carries, with those values) map it; of several, the one with
  the highest ``migration.priority`` decides (``evacuate`` over ``backup`` on a tie).
  The policy's ``host_label`` (default ``instance``) names the host; its value is
  matched against the configured host names, then the host part of ``host:port``,
  then the short name of a fully qualified name, then the hostname in each host's
  libvirt URI (which must point at exactly one host).
- Each occurrence is recorded once in ``alerts``, keyed by (fingerprint, startsAt):
  Alertmanager's repeats of a firing alert are recognised and start nothing. A new
  startsAt (the alert flapped) starts nothing either while an evacuation of that host
  is queued or running, and an evacuation is refused when more than half of the
  host's group would then be draining at once (many hosts alerting together is more
  likely a monitoring fault than a dying rack).
- resolved: the occurrence is marked resolved. Domains are never moved back.
- An alert no policy maps is recorded (with the host its ``instance`` or ``host``
  label names, if any) and starts nothing.

The answer counts occurrences (``new``, ``repeated``, ``resolved``), lists what each
alert did (``alerts``: outcome ``started``, ``already-running``, ``duplicate``,
``refused``, ``unmatched``, ``resolved`` or ``error``; ``actions``: those a policy
mapped to an action, with their job ids) and says whether to ``retry`` (a service was
unreachable, for the action or for any of a backup action's domains: the API answers
503 so that Alertmanager sends the alert again, and the resend finishes the work). Each
alert's outcome is logged in one line.

Delivery is at least once: the alert row is written first and the job carries the
dedup key ``alert:<fingerprint>:<startsAt>``, so a retry after a crash between the two
finishes the work without doubling it.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from virtwarden.catalog import alerts as alert_rows
from virtwarden.catalog import jobs
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config
from virtwarden.errors import Transient, UsageError, VirtwardenError
from virtwarden.policies import Policy, load_policies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapping:
    policy: Policy
    action: str  # evacuate | backup
    host: str | None
    why: str  # when host is None: why no host matched


def receive(cfg: Config, cat: Catalog, payload: dict, actor: str) -> dict:
    """Handle one webhook delivery; returns what was done for each alert."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise UsageError("not an Alertmanager webhook payload: 'alerts' must be a list")
    bad = [i for i, a in enumerate(payload["alerts"])
           if not isinstance(a, dict) or not isinstance(a.get("labels"), dict)]
    if bad:
        raise UsageError(f"not an Alertmanager webhook payload: alerts[{bad[0]}] has no 'labels' object")
    policies = load_policies(cfg)
    out = [_one(cfg, cat, policies, alert, actor) for alert in payload["alerts"]]
    for a in out:  # one line per alert, whatever became of it
        level = logging.WARNING if a["outcome"] in ("error", "refused", "unmatched") else logging.INFO
        log.log(level, "alert %s %s (fingerprint %s, host %s): %s%s%s", a["alertname"] or "(no alertname)",
                a["status"], a["fingerprint"], a.get("host") or "none named", a["outcome"],
                f", {a['action']}" if a.get("action") else "", f": {a['detail']}" if a.get("detail") else
                "; will act on the resend" if a.get("transient") else "")
    seen = [a["occurrence"] for a in out]
    # "retry": a service was unreachable (libvirt, broker): the sender should try again
    # (an HTTP endpoint answers 5xx); the retry finishes what this one could not.
    return {"received": len(out), "new": seen.count("new"), "repeated": seen.count("repeated"),
            "resolved": [a["outcome"] for a in out].count("resolved"), "actions": [a for a in out if a.get("action")],
            "alerts": out, "retry": any(a.get("transient") for a in out)}


def _one(cfg: Config, cat: Catalog, policies: list[Policy], alert: dict, actor: str) -> dict:
    """Handle one alert and record on its row what became of it (``GET /v1/alerts``,
    ``virtwarden alerts``): a repeat that did nothing leaves the earlier word."""
    result = _handle(cfg, cat, policies, alert, actor)
    row_id = result.pop("row_id", None)
    if row_id is not None and result["outcome"] != "duplicate":
        detail = result.get("detail") or "; ".join(f"{e['domain']}: {e['error']}" for e in result.get("errors", []))
        alert_rows.set_outcome(cat, row_id, result["outcome"], detail or None)
    return result


def _handle(cfg: Config, cat: Catalog, policies: list[Policy], alert: dict, actor: str) -> dict:
    labels = {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}
    name = labels.get("alertname", "")
    fingerprint = str(alert.get("fingerprint") or "") or _fingerprint(labels)
    starts = _time(alert.get("startsAt")) or datetime.now(UTC)
    status = alert.get("status") or "firing"
    mapping = _map(cfg, policies, name, labels)
    host = mapping.host if mapping else _named_host(cfg, labels)
    base = {"fingerprint": fingerprint, "alertname": name, "status": status, "starts_at": starts.isoformat(),
            "host": host}
    if status == "resolved":
        ends = _time(alert.get("endsAt")) or datetime.now(UTC)
        view, what = alert_rows.resolve(cat, fingerprint=fingerprint, name=name, labels=labels, host=host,
                                        starts_at=starts, resolved_at=ends)
        return {**base, "occurrence": what if what != "resolved" else "known",
                "outcome": "duplicate" if what == "repeated" else "resolved", "action": None,
                # an occurrence that fired keeps what its firing did; one first heard of resolved says so
                "row_id": view.id if what == "new" else None}
    action = mapping.action if mapping and mapping.host else None
    row, created = alert_rows.record(cat, fingerprint=fingerprint, name=name, status="firing", labels=labels,
                                     host=host, action=action, starts_at=starts)
    base["occurrence"] = "new" if created else "repeated"
    base["row_id"] = row.id
    if mapping is None:
        return {**base, "outcome": "unmatched", "action": None,
                "detail": f"no policy's spec.migration.on_alerts matches alert {name!r}"}
    if mapping.host is None:
        return {**base, "outcome": "unmatched", "action": None, "detail": mapping.why}
    if not created and row.job_id:
        return {**base, "outcome": "duplicate", "action": row.action, "job_id": row.job_id}
    key = f"alert:{fingerprint}:{starts.isoformat()}"
    try:
        if action == "evacuate":
            result = _evacuate(cfg, cat, mapping, key, actor)
        else:
            result = _backup(cfg, cat, mapping, key, actor)
    except VirtwardenError as e:
        return {**base, "outcome": "error", "action": action, "detail": str(e), "transient": isinstance(e, Transient)}
    if result.get("job_id") and not result.get("transient"):  # a resend must act again: not yet its job
        alert_rows.set_job(cat, row.id, result["job_id"])
    return {**base, "action": action, "policy": mapping.policy.name, **result}


# --- actions ------------------------------------------------------------------------------------
def _evacuate(cfg: Config, cat: Catalog, mapping: Mapping, key: str, actor: str) -> dict:
    from virtwarden import submit
    from virtwarden.worker import celery_app

    host = mapping.host or ""
    running = jobs.active(cat, "evacuate", host)
    if running:
        return {"outcome": "already-running", "job_id": running[0].id,
                "detail": f"evacuation job {running[0].id} of {host} is {running[0].state}"}
    group = cfg.host(host).group
    members = [n for n, h in cfg.hosts.items() if h.group == group]
    draining = [n for n in members if n != host and jobs.active(cat, "evacuate", n)]
    if 2 * (len(draining) + 1) > len(members):
        return {"outcome": "refused",
                "detail": f"hosts {', '.join(sorted(draining))} of group {group!r} are being evacuated already:"
                          f" draining {host} too would empty more than half of the group"}
    celery_app.configure(cfg)
    job = submit.submit(cfg, cat, "evacuate", host, requested_by=f"alert:{actor}", dedup_key=key)
    return {"outcome": "started", "job_id": job.id}


def _backup(cfg: Config, cat: Catalog, mapping: Mapping, key: str, actor: str) -> dict:
    """Back up every domain of the host now, each with the backup policy that governs
    it, or with the alert's policy where none does."""
    from virtwarden import submit
    from virtwarden.hypervisor import connect
    from virtwarden.policies import DomainFacts, governing, parse_metadata
    from virtwarden.worker import celery_app

    host = mapping.host or ""
    celery_app.configure(cfg)
    with connect(host, cfg.host(host).uri) as hv:
        found = hv.domains()
    started, failed = [], []
    policies = load_policies(cfg)
    for info in found:
        try:
            own = governing(policies, DomainFacts(info.name, host, parse_metadata(info.xml)), "backup")
            job = submit.submit(cfg, cat, "backup", info.name, host=host, policy=None if own else mapping.policy.name,
                                requested_by=f"alert:{actor}", dedup_key=f"{key}:backup:{info.uuid}")
            started.append({"domain": info.name, "job_id": job.id})
        except VirtwardenError as e:
            failed.append({"domain": info.name, "error": str(e), "transient": isinstance(e, Transient)})
    # A failure that may pass (the broker away) asks for a resend: the jobs started now
    # are found again by their dedup keys, the others are started then.
    return {"outcome": "started" if started or not failed else "error", "jobs": started, "errors": failed,
            "job_id": started[0]["job_id"] if started else None,
            "transient": any(f["transient"] for f in failed)}


# --- mapping an alert to a policy and a host --------------------------------------------------------
def _map(cfg: Config, policies: list[Policy], name: str, labels: dict[str, str]) -> Mapping | None:
    matches = []
    for p in policies:
        m = p.spec.migration
        if m is None:
            continue
        if any(a.alertname == name and all(labels.get(k) == v for k, v in a.labels.items()) for a in m.on_alerts):
            matches.append((p, m))
    if not matches:
        return None
    best, m = min(matches, key=lambda pm: (-pm[1].priority, pm[1].action != "evacuate", pm[0].name))
    value = labels.get(m.host_label)
    if not value:
        return Mapping(best, m.action, None, f"alert {name!r} has no label {m.host_label!r}"
                                             f" (policy {best.name!r} spec.migration.host_label)")
    host, why = host_for(cfg, value)
    return Mapping(best, m.action, host, why or "")


def _named_host(cfg: Config, labels: dict[str, str]) -> str | None:
    """For the record only: the host an alert no policy maps names in its ``instance``
    or ``host`` label, if one does."""
    for label in ("instance", "host"):
        if labels.get(label):
            found, _ = host_for(cfg, labels[label])
            if found:
                return found
    return None


def host_for(cfg: Config, value: str) -> tuple[str | None, str | None]:
    """The configured host a label value names, or (None, why not)."""
    hosts = cfg.hosts
    if value in hosts:
        return value, None
    bare = _strip_port(value)
    if bare in hosts:
        return bare, None
    short = bare.split(".", 1)[0]
    if not _is_ip(bare) and short in hosts:
        return short, None
    by_uri = sorted(n for n, h in hosts.items() if (urlsplit(h.uri).hostname or "").lower() == bare.lower())
    if len(by_uri) == 1:
        return by_uri[0], None
    if len(by_uri) > 1:
        return None, f"{value!r} matches the URIs of several hosts ({', '.join(by_uri)}): label them by host name"
    return None, f"{value!r} names no configured host (configured: {', '.join(sorted(hosts))})"


def _strip_port(value: str) -> str:
    if value.startswith("["):  # [IPv6]:port
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _time(value: object) -> datetime | None:
    """Alertmanager's RFC 3339 times (nanoseconds and 'Z' included); its zero time
    ("0001-01-01T00:00:00Z") means unset."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in text:  # Python takes at most microseconds
        head, rest = text.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager always sends a fingerprint; without one, the labels identify the alert."""
    import hashlib

    return hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16]
