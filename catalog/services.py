"""Running workers, schedulers and listeners, as each reports itself (table ``services``).

A daemon opens a ``Presence`` when it starts: its row is written at once, then renewed
every ``BEAT_SECONDS`` by a thread of its own (with the database's clock, as leases are),
and removed when the daemon stops cleanly. A daemon that is killed, hangs or loses the
catalog leaves its row behind with a ``seen_at`` that no longer moves: the API's metrics
report its age (``virtwarden_service_last_seen_age_seconds``) and the shipped alerting
rules page after 5 minutes. A listener also reports its backlog with each beat (events
not handled yet by its dispatcher, and how long the oldest has waited). A row is keyed by kind,
machine and the hosts served, so a
daemon restarted in the same place (by systemd, say) takes its row over at once.
Rows unseen for ``FORGET_AFTER`` are removed by any beat: a machine retired without a
clean stop drops out of the metrics after a week.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from virtwarden.catalog.clock import db_later, db_now
from virtwarden.catalog.models import Service, utcnow
from virtwarden.catalog.store import Catalog, upsert
from virtwarden.catalog.views import BEAT_SECONDS, ServiceView

from virtwarden import __version__
from virtwarden.errors import VirtwardenError

log = logging.getLogger(__name__)
FORGET_AFTER = 7 * 24 * 3600.0


def service_id(kind: str, node: str, hosts: list[str]) -> str:
    text = f"{kind}:{node}:{','.join(sorted(hosts))}"
    return text if len(text) <= 255 else f"{text[:190]}~{hashlib.sha256(text.encode()).hexdigest()}"


def listed(cat: Catalog) -> list[ServiceView]:
    with cat.session() as s:
        return [ServiceView(r.kind, r.node, r.hosts, r.pid, r.version, r.started_at, r.seen_at, r.backlog,
                            r.lag_seconds)
                for r in s.scalars(select(Service).order_by(Service.kind, Service.node, Service.hosts))]


class Presence:
    """``Presence(cat, "worker", hosts).start()`` ... ``.close()``: this process's row."""

    def __init__(self, cat: Catalog, kind: str, hosts: list[str], *,
                 backlog: Callable[[], tuple[int, float]] | None = None, every: float = BEAT_SECONDS) -> None:
        """``backlog``: what a listener reports with each beat (waiting events, the oldest
        one's wait in seconds); ``every``: seconds between beats."""
        self.cat, self.kind = cat, kind
        self.backlog, self.every = backlog, every
        self.node = socket.gethostname()
        self.hosts = ",".join(sorted(hosts))
        self.id = service_id(kind, self.node, hosts)
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Presence:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name=f"presence-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> bool:
        """Write this process's row now; False (logged) when the catalog is away."""
        row: dict[str, Any] = {"kind": self.kind, "node": self.node, "hosts": self.hosts, "pid": os.getpid(),
                               "version": __version__, "started_at": self.started_at}
        if self.backlog is not None:
            row["backlog"], row["lag_seconds"] = self.backlog()
        try:
            with self.cat.session() as s:
                s.execute(upsert(s, Service, {"id": self.id}, {**row, "seen_at": db_now()}))
                s.execute(delete(Service).where(Service.seen_at < db_later(-FORGET_AFTER)))
        except VirtwardenError as e:
            log.warning("%s: could not report itself to the catalog: %s", self.kind, e)
            return False
        return True

    def close(self) -> None:
        """A clean stop: the row goes (a process that dies never gets here)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            with self.cat.session() as s:
                s.execute(delete(Service).where(Service.id == self.id, Service.pid == os.getpid()))
        except VirtwardenError as e:
            log.warning("%s: could not remove its row from the catalog: %s", self.kind, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception:  # the daemon outlives a bug here; the row ageing shows it
                log.exception("%s: reporting itself failed (a bug)", self.kind)
