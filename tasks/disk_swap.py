"""Replacing a shut-off domain's disk images with restored ones, undoably.

For each disk the restored image is first written under a hidden temporary name in the
same directory as the image it replaces. The swap is then only renames: each image
being replaced (the disk's own image, and any change-tracking overlays of ours above
it) moves aside to ``<name>.before-restore-<time>`` in the same directory, and the
temporary image takes the disk's name. Renames in one directory are atomic and copy
nothing, so the domain is down only for them.

Before the first rename, every intended move and the domain's old definition are
written to a journal file; a job that is started again after its worker died undoes
whatever that journal says was begun (``recover``), so a half-done swap never stays.
Undoing a move means: if its destination exists and its source does not, rename it
back. Applied to the moves in reverse order this restores the original names whatever
subset of the moves had happened.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from tasks.restore import RestoreRefused, fsync_dir
from tasks.restore_plan import RestorePlan

log = logging.getLogger(__name__)
ASIDE_SUFFIX = ".before-restore-"


class DiskSwap:
    def __init__(self, plan: RestorePlan, job_id: str, journal: Path) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.journal = journal
        self.temps = {d.target: Path(d.path).with_name(f".{Path(d.path).name}.restoring-{job_id[:8]}")
                      for d in plan.disks}
        self.aside = {p: Path(f"{p}{ASIDE_SUFFIX}{stamp}") for d in plan.disks for p in d.replaces}
        self.moves: list[tuple[Path, Path]] = []
        self.applied: list[tuple[Path, Path]] = []  # the moves made by this process
        for d in plan.disks:
            self.moves += [(Path(p), self.aside[p]) for p in d.replaces]
            self.moves.append((self.temps[d.target], Path(d.path)))

    def check(self) -> None:
        taken = [str(p) for p in self.aside.values() if p.exists()]
        if taken:
            raise RestoreRefused(f"{', '.join(taken)} already exist; not overwriting them (nothing was changed)")
        for temp in self.temps.values():  # an earlier attempt of this job left it: ours
            temp.unlink(missing_ok=True)

    def apply(self, old_xml: str, restart: bool) -> None:
        """Write the journal, then rename everything into place."""
        body = {"moves": [[str(a), str(b)] for a, b in self.moves], "old_xml": old_xml, "restart": restart}
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal)
        for src, dst in self.moves:
            os.rename(src, dst)
            self.applied.append((src, dst))
        for d in {dst.parent for _, dst in self.moves}:
            fsync_dir(d)

    def undo(self) -> list[str]:
        """Put every original image back and remove the restored ones; returns problems."""
        problems = _undo_moves(self.applied)
        self.applied = []
        for temp in self.temps.values():
            _unlink(temp, problems)
        if not problems:
            self.journal.unlink(missing_ok=True)
        return problems

    def done(self) -> None:
        """The images and definition are in place: a later attempt must not undo them
        (``undo`` in this process still can)."""
        self.journal.unlink(missing_ok=True)

    @property
    def set_aside(self) -> list[str]:
        return [str(p) for p in self.aside.values()]

    def discard(self, warnings: list[str]) -> list[str]:
        gone = []
        for p in self.aside.values():
            if _unlink(p, warnings):
                gone.append(str(p))
        return gone

    def cleanup_temps(self) -> None:
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)


def recover(journal: Path) -> dict | None:
    """Undo the swap an earlier, interrupted attempt began; returns its journal (with
    the old definition to put back and whether the domain ran), or None when there was
    nothing to undo. The journal is written only once every restored image exists
    under its temporary name, which is what makes the undo rule exact: a move whose
    source still exists never happened."""
    if not journal.exists():
        return None
    body = json.loads(journal.read_text())
    moves = [(Path(a), Path(b)) for a, b in body["moves"]]
    problems = _undo_moves(moves)
    for src, _ in moves:
        if ".restoring-" in src.name:
            _unlink(src, problems)
    if problems:
        raise RestoreRefused("an earlier attempt of this restore was interrupted and its disks could not all be "
                             f"put back: {'; '.join(problems)}; see {journal}")
    journal.unlink()
    return body


def _undo_moves(moves: list[tuple[Path, Path]]) -> list[str]:
    problems: list[str] = []
    for src, dst in reversed(moves):
        if dst.exists() and not src.exists():
            try:
                os.rename(dst, src)
            except OSError as e:
                problems.append(f"renaming {dst} back to {src}: {e.strerror}")
    for d in {src.parent for src, _ in moves}:
        try:
            fsync_dir(d)
        except OSError:
            pass
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
