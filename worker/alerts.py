"""Alertmanager notifications received by the API, recorded in the catalog.

Alertmanager delivers at least once and repeats a group every ``repeat_interval``, so
an alert occurrence is identified by (fingerprint, startsAt): one ``alerts`` row each.
A repeat changes nothing; a resolution marks the row resolved. No action is taken on
an alert yet (``action`` stays empty).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from catalog.models import Alert, utcnow
from catalog.store import Catalog
from virtwarden.config import Config


def receive(cfg: Config, cat: Catalog, payload: dict[str, Any], actor: str) -> dict[str, Any]:
    """Record every alert of a validated webhook payload; counts of what changed."""
    counts = {"received": len(payload["alerts"]), "new": 0, "resolved": 0, "repeated": 0}
    with cat.session() as s:
        for a in payload["alerts"]:
            starts = datetime.fromisoformat(a["startsAt"])
            row = s.scalars(select(Alert).where(Alert.fingerprint == a["fingerprint"],
                                                Alert.starts_at == starts)).first()
            if row is None:
                row = Alert(fingerprint=a["fingerprint"], name=a["labels"].get("alertname", a["fingerprint"]),
                            status="firing", labels=a["labels"], host=a["labels"].get("host"), action=None,
                            starts_at=starts, received_at=utcnow())
                s.add(row)
                counts["new"] += 1
            elif a["status"] == row.status:
                counts["repeated"] += 1
            if a["status"] == "resolved" and row.status != "resolved":
                row.status, row.resolved_at = "resolved", _resolved_at(a)
                counts["resolved"] += 1
            s.flush()
    return {**counts, "actions": []}


def _resolved_at(alert: dict[str, Any]) -> datetime:
    ends = datetime.fromisoformat(alert["endsAt"]) if alert.get("endsAt") else None
    return ends if ends and ends.year > 1 else utcnow()
