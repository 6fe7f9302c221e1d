"""A connection per host, kept open between uses, for the daemons (scheduler, listener).

Opening a libvirt connection costs a round trip or more (a TLS or SSH handshake on a real
fleet); a daemon that opens one per tick or per event spends most of its time there.
``KeptConnections.use(host, fn)`` runs ``fn(hv)`` on the host's kept connection, opening
it on first use. When the connection turns out to be lost (``HypervisorUnavailable``:
libvirtd restarted, the network dropped it), it is closed and ``fn`` runs once more on a
new one, so a restarted libvirtd costs the caller nothing; a host that cannot be reached
raises as before. Other errors (a domain not found, a refused call) leave the connection
in place. Safe from several threads, as long as each host is used by one at a time.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from virtwarden.config import Config
from virtwarden.errors import HypervisorUnavailable
from virtwarden.hypervisor import Hypervisor, connect

T = TypeVar("T")


class KeptConnections:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._open: dict[str, Hypervisor] = {}
        self._guard = threading.Lock()

    def use(self, host: str, fn: Callable[[Hypervisor], T]) -> T:
        with self._guard:
            kept = self._open.pop(host, None)
        if kept is not None:
            try:
                return self._run(host, kept, fn)
            except HypervisorUnavailable:
                pass  # lost: once more on a new connection
        return self._run(host, connect(host, self.cfg.host(host).uri).open(), fn)

    def kept(self, host: str) -> Hypervisor | None:
        with self._guard:
            return self._open.get(host)

    def close(self) -> None:
        with self._guard:
            kept, self._open = self._open, {}
        for hv in kept.values():
            hv.close()

    def _run(self, host: str, hv: Hypervisor, fn: Callable[[Hypervisor], T]) -> T:
        """``fn(hv)``, keeping ``hv`` unless it turned out to be lost."""
        try:
            result = fn(hv)
        except HypervisorUnavailable:
            hv.close()
            raise
        except BaseException:
            self._keep(host, hv)
            raise
        self._keep(host, hv)
        return result

    def _keep(self, host: str, hv: Hypervisor) -> None:
        with self._guard:
            old = self._open.pop(host, None)
            self._open[host] = hv
        if old is not None and old is not hv:
            old.close()
