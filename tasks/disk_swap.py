"""Replacing a shut-off domain's disk images with restored ones: undoable until it is
done, never repeated once it is.

For each disk the restored image is first written under a hidden temporary name in the
same directory as the image it replaces (the name carries the job and the attempt's
fencing token, so two attempts never share one). The swap is then only renames: each
image being replaced (the disk's own image, and any change-tracking overlays of ours
above it) moves aside to ``<name>.before-restore-<time>`` in the same directory, and the
temporary image takes the disk's name. Renames in one directory are atomic and copy
nothing, so the domain is down only for them.

A journal (``SwapJournal``, one file per job in the host's scratch space) says how far
the job got, in states written durably (temporary file fsynced, renamed over the
journal, directory fsynced):

- ``stopping``: the domain is about to be shut off; whether it was running;
- ``swapping``: every intended move, the temporary images and the domain's old
  definition, written before the first rename and only once every restored image is
  complete, which makes the undo rule exact (``roll_back``): applied to the moves in
  reverse order, "if its destination exists and its source does not, rename it back"
  restores the original names whatever subset of the moves had happened;
- ``swapped``: every rename is done and the new definition is in place. From here the
  restore stands: an attempt that finds this state finishes what is left and never
  rebuilds, renames or discards anything a second time.

The journal is removed once the job's outcome is recorded (or, when the worker died
right then, by the next in-place restore on the host); one whose swap could not be put
back stays for the operator.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virtwarden.tasks.restore import RestoreRefused, fsync_dir
from virtwarden.tasks.restore_plan import RestorePlan

from virtwarden import faults

log = logging.getLogger(__name__)
ASIDE_SUFFIX = ".before-restore-"
TEMP_MARK = ".restoring-"
STOPPING, SWAPPING, SWAPPED = "stopping", "swapping", "swapped"
AFTER_FIRST_DISK = "in-place-after-first-disk"  # fault point: one disk swapped, the others not

Move = tuple[Path, Path]


class SwapJournal:
    """One in-place restore job's durable record of how far it got (see module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body: dict[str, Any] = _read(path)

    @property
    def state(self) -> str | None:
        return self.body.get("state")

    def record(self, state: str, **fields: Any) -> None:
        """Add ``fields`` and move to ``state``; on disk (file and directory) on return."""
        body = {**self.body, **fields, "state": state}
        _write_durably(self.path, body)
        self.body = body

    def forget(self) -> None:
        """Remove the journal (durably): there is nothing left to undo or finish."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        else:
            fsync_dir(self.path.parent)
        self.body = {}


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        body = json.loads(text)
    except ValueError as e:
        raise RestoreRefused(f"the restore journal {path} cannot be read ({e}); check the domain's disks by hand "
                             "against it, then remove it") from e
    return body if isinstance(body, dict) else {}


def _write_durably(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DiskSwap:
    """The renames that put one plan's restored images in place."""

    def __init__(self, plan: RestorePlan, job_id: str, token: int = 0) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        tag = f"{job_id[:8]}.{token}" if token else job_id[:8]
        self.job_id = job_id
        self.images = [d.path for d in plan.disks]
        self.temps = {d.target: Path(d.path).with_name(f".{Path(d.path).name}{TEMP_MARK}{tag}") for d in plan.disks}
        self.aside = {p: Path(f"{p}{ASIDE_SUFFIX}{stamp}") for d in plan.disks for p in d.replaces}
        self.per_disk: list[list[Move]] = [
            [(Path(p), self.aside[p]) for p in d.replaces] + [(self.temps[d.target], Path(d.path))]
            for d in plan.disks]

    @property
    def moves(self) -> list[Move]:
        return [m for disk in self.per_disk for m in disk]

    def check(self) -> None:
        """Refuse when an image would be set aside over an existing file; remove the
        temporary images earlier attempts of this job left."""
        taken = [str(p) for p in self.aside.values() if p.exists()]
        if taken:
            raise RestoreRefused(f"{', '.join(taken)} already exist; not overwriting them (nothing was changed)")
        remove_temps(self.images, self.job_id)

    def sync_temps(self) -> None:
        """Make the restored images' names durable. The undo rule relies on every
        temporary image existing until its rename, so this precedes the ``swapping``
        state: after a power loss a missing temporary name would otherwise read as
        "renamed" and move an original image out of the way."""
        for d in {temp.parent for temp in self.temps.values()}:
            fsync_dir(d)

    def journal_fields(self) -> dict[str, Any]:
        """What the ``swapping`` state must hold for ``roll_back`` and for finishing."""
        return {"moves": [[str(a), str(b)] for a, b in self.moves],
                "temps": {t: str(p) for t, p in self.temps.items()},
                "aside": [str(p) for p in self.aside.values()]}

    def apply(self) -> None:
        """Rename everything into place, disk by disk, then make the renames durable.
        The journal must say ``swapping`` first."""
        for i, moves in enumerate(self.per_disk):
            for src, dst in moves:
                os.rename(src, dst)
            if i == 0:
                faults.pause_point(AFTER_FIRST_DISK)
        for d in {dst.parent for dst in (b for _, b in self.moves)}:
            fsync_dir(d)

    def cleanup_temps(self) -> None:
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)


def roll_back(body: dict[str, Any]) -> list[str]:
    """Put back every image a ``swapping`` journal's moves replaced, whichever of them
    happened, and remove the restored images; returns what could not be done."""
    moves = [(Path(a), Path(b)) for a, b in body.get("moves", [])]
    problems = _undo_moves(moves)
    if not problems:
        for temp in body.get("temps", {}).values():
            _unlink(Path(temp), problems)
    return problems


def how_to_put_back(body: dict[str, Any]) -> str:
    """The renames ``roll_back`` would make now, for a message to do them by hand."""
    steps = [f"mv {b} {a}" for a, b in reversed(body.get("moves", []))
             if Path(b).exists() and not Path(a).exists()]
    return "; ".join(steps) or "no rename is needed"


def discard(paths: list[str], warnings: list[str]) -> list[str]:
    """Delete the set-aside images; returns those that are gone now (this call or an
    earlier one removed them), each reported once in the result of its job."""
    for p in paths:
        _unlink(Path(p), warnings)
    return [p for p in paths if not Path(p).exists()]


def remove_temps(images: Iterable[str], job_id: str) -> None:
    """Remove the temporary images any attempt of ``job_id`` left beside ``images``."""
    for image in map(Path, images):
        for temp in image.parent.glob(f".{image.name}{TEMP_MARK}{job_id[:8]}*"):
            temp.unlink(missing_ok=True)


def _undo_moves(moves: list[Move]) -> list[str]:
    problems: list[str] = []
    for src, dst in reversed(moves):
        if dst.exists() and not src.exists():
            try:
                os.rename(dst, src)
            except OSError as e:
                problems.append(f"renaming {dst} back to {src}: {e.strerror}")
    for d in {src.parent for src, _ in moves}:
        with contextlib.suppress(OSError):
            fsync_dir(d)
    return problems


def _unlink(path: Path, problems: list[str]) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        problems.append(f"removing {path}: {e.strerror}")
        return False


def same_owner(like: Path, path: Path) -> None:
    """Give a restored image the owner and mode of the image it replaces (best effort)."""
    try:
        st = like.stat()
        os.chmod(path, st.st_mode & 0o7777)
        os.chown(path, st.st_uid, st.st_gid)
    except OSError as e:
        log.warning("could not give %s the owner and mode of %s: %s", path, like, e.strerror)
