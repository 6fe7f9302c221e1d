"""The overlay journal: every external overlay a ``blockcommit`` backup creates.

A row is written *before* libvirt creates the overlay file, so whatever happens next
(the snapshot fails, the worker dies mid-copy, a commit is cut short) a later run can
compare the journal with the domain's live backing chain and finish or undo the work.
Only overlays recorded here are ever merged or deleted; any other layer is someone
else's and is left alone.

States::

    created    journaled; the snapshot may or may not exist; its run has not finished
    tracking   the live change tracker of a complete restore point: it holds exactly
               the clusters written since that point
    merging    a block commit that takes it out of the chain was started
    committed  out of the chain, its data merged into the layer below, file deleted
    abandoned  never entered the chain (snapshot failed), or left it without us
               (the file is then left in place)
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from virtwarden.catalog.models import Overlay, utcnow
from virtwarden.catalog.store import Catalog

CREATED, TRACKING, MERGING, COMMITTED, ABANDONED = "created", "tracking", "merging", "committed", "abandoned"
OPEN = (CREATED, TRACKING, MERGING)  # states that may still be in a live chain


@dataclass(frozen=True)
class OverlayView:
    id: int
    job_id: str
    domain: str
    target: str
    overlay_path: str
    base_path: str  # the image it was created on (its backing file at creation)
    state: str
    created_at: datetime


def _view(row: Overlay) -> OverlayView:
    return OverlayView(row.id, row.job_id, row.domain, row.target, row.overlay_path, row.base_path,
                       row.state, row.created_at)


def record(cat: Catalog, *, job_id: str, domain: str, target: str, overlay_path: str,
           base_path: str) -> OverlayView:
    """Journal an overlay about to be created (state ``created``)."""
    with cat.session() as s:
        row = Overlay(job_id=job_id, domain=domain, target=target, overlay_path=overlay_path,
                      base_path=base_path, state=CREATED, created_at=utcnow())
        s.add(row)
        s.flush()
        return _view(row)


def set_state(cat: Catalog, ids: list[int], state: str) -> None:
    if not ids:
        return
    with cat.session() as s:
        s.execute(update(Overlay).where(Overlay.id.in_(ids)).values(state=state))


def open_for_domain(cat: Catalog, domain: str) -> list[OverlayView]:
    """Overlays of ``domain`` that may still be part of its live chains, oldest first."""
    with cat.session() as s:
        rows = s.scalars(select(Overlay).where(Overlay.domain == domain, Overlay.state.in_(OPEN))
                         .order_by(Overlay.id))
        return [_view(r) for r in rows]


def for_run(cat: Catalog, domain: str, token: str) -> list[OverlayView]:
    """The overlays one run created (their file names end in ``.<token>.qcow2``)."""
    with cat.session() as s:
        rows = s.scalars(select(Overlay).where(Overlay.domain == domain,
                                               Overlay.overlay_path.endswith(f".{token}.qcow2", autoescape=True))
                         .order_by(Overlay.id))
        return [_view(r) for r in rows]


def for_domain(cat: Catalog, domain: str) -> list[OverlayView]:
    """Every journaled overlay of ``domain``, oldest first (for reports and tests)."""
    with cat.session() as s:
        return [_view(r) for r in s.scalars(select(Overlay).where(Overlay.domain == domain).order_by(Overlay.id))]


def committed_paths(cat: Catalog, domain: str, paths: list[str]) -> set[str]:
    """Which of ``paths`` are overlays of ``domain`` the journal records as merged."""
    if not paths:
        return set()
    with cat.session() as s:
        return set(s.scalars(select(Overlay.overlay_path).where(Overlay.domain == domain, Overlay.state == COMMITTED,
                                                                Overlay.overlay_path.in_(paths))))
