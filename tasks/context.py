"""What a job function is given: narrow handles to the hypervisor, storage and catalog.

Jobs never build these themselves; ``worker/`` does (or a test does), so a job can run
under Celery, from the CLI or in a test alike.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from virtwarden.catalog.store import Catalog
from virtwarden.hypervisor import connect as connect_libvirt
from virtwarden.hypervisor.types import Connect, Hypervisor
from virtwarden.storage_backends.base import Backend
from virtwarden.storage_backends.format2.repository import Format2Repository

from virtwarden.config import AgentConfig, DrillConfig

# Records progress (fraction done, a line of text); raises LeaseLost when the job must
# stop because its lease was lost.
Reporter = Callable[[float, str], None]
# Proves, right before a step named by its argument, that this attempt still owns the
# job; raises LeaseLost otherwise.
OwnerCheck = Callable[[str], None]


def _quiet(_fraction: float, _text: str) -> None:
    return None


def _unfenced(_action: str) -> None:
    return None


def _format1(_storage: str) -> Format2Repository | None:
    return None


@dataclass
class JobContext:
    job_id: str
    catalog: Catalog
    # The job's host, opened by the worker (None for jobs that need none).
    hypervisor: Hypervisor | None
    storage: Callable[[str], Backend]  # storage name -> backend (raises UnknownStorage)
    scratch_root: Path
    report: Reporter = _quiet
    attempt: int = 1
    # The attempt's fencing token (catalog.fencing); 0 outside a worker.
    token: int = 0
    confirm_owner: OwnerCheck = _unfenced
    poll_seconds: float = 0.2  # libvirt job polls: cheap, and they bound the added latency
    # Where confined restores may write: the worker's restore.allowed_dirs (tasks/confine.py).
    restore_roots: tuple[str, ...] = ()
    # The configuration's ``agent`` and ``drill`` sections (guest agent timeouts, drill polls).
    agent: AgentConfig = field(default_factory=AgentConfig)
    drill: DrillConfig = field(default_factory=DrillConfig)
    # storage name -> its format-2 repository, key loaded; None for a format-1 target.
    repository: Callable[[str], Format2Repository | None] = _format1
    # Opens another host (host name, libvirt URI): what the worker opened ``hypervisor`` with.
    connect: Connect = connect_libvirt
    _scratch: Path | None = field(default=None, repr=False)

    def ensure_owner(self, action: str) -> None:
        """Call right before a step that changes something outside the catalog (abort a
        libvirt job, commit or delete an overlay, delete a checkpoint or a stored
        object, swap disks): LeaseLost when another attempt owns the job now. Catalog
        writes need no call: the job's catalog checks them itself."""
        self.confirm_owner(action)

    @property
    def scratch(self) -> Path:
        """This attempt's own scratch directory: another attempt of the same job (a
        worker that lost the job and has not noticed yet) never shares it."""
        if self._scratch is None:
            name = f"job-{self.job_id}" + (f".{self.token}" if self.token else "")
            self._scratch = self.scratch_root / name
        return self._scratch

    def clear_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def clear_stale_scratch(self) -> None:
        """Remove what earlier attempts of this job left in scratch space (recovery)."""
        if not self.scratch_root.is_dir():
            return
        for path in [self.scratch_root / f"job-{self.job_id}", *self.scratch_root.glob(f"job-{self.job_id}.*")]:
            if path != self.scratch and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def require_hypervisor(self) -> Hypervisor:
        assert self.hypervisor is not None, "this job needs a hypervisor connection"
        return self.hypervisor
