"""What the HTTP API must remember across requests and processes: signatures already
used (replay protection) and idempotency keys (one job per key).

Both live in the catalog rather than in one process's memory, so any number of API
processes behind a load balancer agree: a signature accepted by one is a replay at
another, and a retried request reaches the same job wherever it lands.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from virtwarden.catalog.models import ApiIdempotencyKey, ApiNonce, utcnow
from virtwarden.catalog.store import Catalog


def use_signature(cat: Catalog, signature: str, expires_at: datetime) -> bool:
    """Record a signature as used; False when it was used before (a replay). Signatures
    whose window has passed are forgotten here too (the timestamp check refuses them)."""
    try:
        with cat.session() as s:
            s.execute(delete(ApiNonce).where(ApiNonce.expires_at < utcnow()))
            s.add(ApiNonce(signature=signature, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


@dataclass(frozen=True)
class KeyUse:
    job_id: str
    request_sha256: str


def key_use(cat: Catalog, key: str) -> KeyUse | None:
    with cat.session() as s:
        row = s.get(ApiIdempotencyKey, key)
        return KeyUse(row.job_id, row.request_sha256) if row else None


def remember_key(cat: Catalog, key: str, request_sha256: str, job_id: str, actor: str) -> tuple[KeyUse, bool]:
    """Store the key's request and job; True when this call stored it. When a concurrent
    request with the same key stored it first, that one's use is returned with False."""
    try:
        with cat.session() as s:
            s.add(ApiIdempotencyKey(key=key, request_sha256=request_sha256, job_id=job_id, actor=actor,
                                    created_at=utcnow()))
    except IntegrityError:
        found = key_use(cat, key)
        if found is None:  # pruned in between: only a key at the end of its period, a week old
            raise
        return found, False
    return KeyUse(job_id, request_sha256), True
