"""Who may read what virtwarden writes, and whether the files holding its secrets are private.

Everything the product writes is private to the user it runs as (root for the worker):
repository files and their temporary names, scratch directories and the artifacts
copied into them, files libvirt wrote into the repository for a backup (their mode is
set when they are published), the SQLite catalog with its WAL, lock and journal files.
Files are 0600, directories 0700, whatever the umask. Two settings open this up
(``security`` in the configuration):

- ``read_group``: the repository and scratch space may be read by this group (an
  off-site copy job, an auditor): files 0640, directories 0750, in that group.
- ``service_group``: the group of virtwarden's unprivileged daemons (the API runs as
  the ``virtwarden`` user in the systemd units). An SQLite catalog is shared with it
  (0660, its directory 0770), and the files holding secrets (configuration, token file,
  HMAC key) may be readable by it (0640, group ``service_group``) without a warning.

When QEMU runs as an unprivileged user (``user = "libvirt-qemu"`` in qemu.conf, Debian's
default), it opens the images libvirt hands it by their path: backup targets in the
repository or in scratch space and a drill's restored disks. It must then pass through
those directories, so the worker gives them the search bit for others (0711; 0751 with
a read group): no one else can list them, and their files stay 0600
(``allow_qemu_passage``, decided from libvirt's DAC label when the worker starts).

Every daemon and the CLI set the umask to 0077 first (``restrict_umask``), so what they
create through other programs (qemu-img writing a restored image) is private as well.
"""
from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import stat
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from virtwarden.errors import ConfigError

log = logging.getLogger(__name__)

UMASK = 0o077
# With QEMU unprivileged: files still 0600, directories 0711 (others may pass, not list).
PASSAGE_UMASK = 0o066


@dataclass(frozen=True)
class Policy:
    read_group: str | None = None
    read_gid: int | None = None
    service_group: str | None = None
    service_gid: int | None = None
    qemu_passage: bool = False

    @property
    def file_mode(self) -> int:
        """Repository and scratch files."""
        return 0o640 if self.read_gid is not None else 0o600

    @property
    def dir_mode(self) -> int:
        """Repository and scratch directories."""
        mode = 0o750 if self.read_gid is not None else 0o700
        return mode | (0o011 if self.qemu_passage else 0)

    @property
    def catalog_file_mode(self) -> int:
        return 0o660 if self.service_gid is not None else 0o600

    @property
    def catalog_dir_mode(self) -> int:
        """The catalog's directory, when made here: the data directory by default,
        which holds scratch space too (hence QEMU's passage)."""
        mode = 0o770 if self.service_gid is not None else 0o700
        return mode | (0o011 if self.qemu_passage else 0)


_policy = Policy()
_lock = threading.Lock()
_chgrp_failed: set[str] = set()


def current() -> Policy:
    return _policy


def configure(read_group: str | None = None, service_group: str | None = None) -> Policy:
    """Set this process's policy from the configuration's ``security`` section; an
    unknown group is a configuration error (it must exist on every machine that uses
    the configuration)."""
    global _policy
    with _lock:
        _policy = replace(_policy, read_group=read_group, read_gid=_gid(read_group, "security.read_group"),
                          service_group=service_group,
                          service_gid=_gid(service_group, "security.service_group"))
        return _policy


def allow_qemu_passage(qemu_uid: int | None) -> bool:
    """Let an unprivileged QEMU (uid ``qemu_uid``) pass through the directories the
    worker makes; root's QEMU needs nothing. Returns whether passage is now allowed."""
    global _policy
    needed = qemu_uid is not None and qemu_uid != 0
    with _lock:
        _policy = replace(_policy, qemu_passage=needed)
    os.umask(PASSAGE_UMASK if needed else UMASK)
    return needed


def let_qemu_through(paths, qemu_uid: int | None = None) -> list[Path]:  # any iterable of paths
    """When QEMU is unprivileged, give each of ``paths`` and every directory above it
    the search bit for others (never read), so QEMU reaches the files libvirt hands it
    there; directories made before (while QEMU ran as root, or by hand) are fixed as a
    backup needs them. A no-op when QEMU runs as root: the host's (``allow_qemu_passage``)
    and, when given, ``qemu_uid`` (a domain with its own DAC label). Returns the
    directories changed."""
    if not _policy.qemu_passage and not qemu_uid:
        return []
    changed = []
    seen: set[Path] = set()
    for start in paths:
        for directory in [Path(start), *Path(start).parents]:
            if directory in seen:
                break
            seen.add(directory)
            try:
                mode = stat.S_IMODE(os.stat(directory).st_mode)
            except FileNotFoundError:
                continue
            if not mode & 0o001:
                os.chmod(directory, mode | 0o001)
                changed.append(directory)
    if changed:
        log.info("QEMU runs unprivileged: it may now pass through (not list) %s", ", ".join(map(str, changed)))
    return changed


def restrict_umask() -> int:
    """Every daemon and the CLI call this first; returns the previous umask."""
    return os.umask(UMASK)


def _gid(name: str | None, setting: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{setting}: no group {name!r} on this machine (groupadd --system {name})") from None


# --- data: repository and scratch ------------------------------------------------
def secure_file(path: Path | str) -> None:
    """Give a repository or scratch file its mode (and group), e.g. one libvirt wrote."""
    _apply(path, _policy.file_mode, _policy.read_gid, _policy.read_group)


def adopt_file(path: Path | str) -> None:
    """A file someone else wrote for us (libvirt, for QEMU's user): ours, with the data
    mode. As root, its owner becomes root, so QEMU's user keeps no access to it."""
    if os.geteuid() == 0 and os.stat(path).st_uid != 0:
        os.chown(path, 0, -1)
    secure_file(path)


def secure_fd(fd: int, name: Path | str) -> None:
    _apply(fd, _policy.file_mode, _policy.read_gid, _policy.read_group, name)


def secure_dir(path: Path | str) -> None:
    _apply(path, _policy.dir_mode, _policy.read_gid, _policy.read_group)


def create_file(path: Path | str) -> int:
    """A new file (O_EXCL, not through a symlink) with the data mode; its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _policy.file_mode)
    try:
        secure_fd(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(path: Path | str) -> None:
    """``mkdir`` with the data mode whatever the umask; FileExistsError when it exists."""
    os.mkdir(path, _policy.dir_mode)
    secure_dir(path)


def make_dirs(path: Path | str) -> list[Path]:
    """``mkdir -p`` where each directory created gets the data mode (existing ones are
    left). Returns the directories this call created, outermost first."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    created = []
    for directory in reversed(missing):
        try:
            make_dir(directory)
        except FileExistsError:
            continue
        created.append(directory)
    return created


# --- the catalog -------------------------------------------------------------------
def secure_catalog_file(path: Path | str) -> None:
    _apply(path, _policy.catalog_file_mode, _policy.service_gid, _policy.service_group)


def prepare_catalog(path: Path | str) -> None:
    """Before SQLite opens ``path``: its directory exists with the catalog's mode when
    made here, and the file exists with the catalog's mode (created empty: SQLite would
    otherwise create it through the umask). An existing catalog gets its mode too, so
    one left readable by an older release is closed when a process opens it."""
    path = Path(path)
    if not path.parent.is_dir():
        for directory in reversed([p for p in [path.parent, *path.parent.parents] if not p.is_dir()]):
            try:
                os.mkdir(directory, _policy.catalog_dir_mode)
            except FileExistsError:
                continue
            _apply(directory, _policy.catalog_dir_mode, _policy.service_gid, _policy.service_group)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         _policy.catalog_file_mode))
    secure_catalog_file_if_mine(path)


def secure_catalog_file_if_mine(path: Path | str) -> None:
    """The catalog's mode on ``path`` when this process owns it (another user's file, as
    the worker's catalog is for the API, is left to its owner); missing files are fine."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() or os.geteuid() == 0:
        want = _policy.catalog_file_mode
        if stat.S_IMODE(st.st_mode) != want or (_policy.service_gid is not None and st.st_gid != _policy.service_gid):
            secure_catalog_file(path)


# --- files that hold secrets -------------------------------------------------------
def exposure(path: Path | str) -> str | None:
    """Why ``path`` (a file holding a secret) is not private, or None when it is: no
    permission for others, none for its group unless the group is ``service_group``
    (read only). A file owned by root's group (gid 0) may be group-readable."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        what = "readable" if mode & 0o004 else "writable" if mode & 0o002 else "accessible"
        return f"{what} by every local user (mode {mode:04o})"
    if mode & 0o020:
        return f"writable by group {_group_name(st.st_gid)} (mode {mode:04o})"
    if mode & 0o070 and st.st_gid not in (0, _policy.service_gid):
        return f"readable by group {_group_name(st.st_gid)} (mode {mode:04o})"
    return None


def advice(path: Path | str) -> str:
    group = _policy.service_group
    fix = f"chmod 600 {path}"
    if group:
        fix += f" (or chgrp {group} {path} && chmod 640 {path}, for the service group)"
    return fix


def warn_if_exposed(path: Path | str, what: str) -> str | None:
    """Log a warning when ``path`` holding ``what`` is not private; returns the reason.
    Like the API's token file, an exposed file is used anyway: the warning says how to
    close it."""
    try:
        reason = exposure(path)
    except OSError:
        return None  # reading it reports the error
    if reason:
        log.warning("%s holds %s and is %s; %s", path, what, reason, advice(path))
    return reason


# --- helpers -------------------------------------------------------------------------
def _apply(target: Path | str | int, mode: int, gid: int | None, group: str | None,
           name: Path | str | None = None) -> None:
    """``target`` is a path or an open file descriptor (``name`` says which file, for the
    warning). Only what differs is changed: a chown the group already has would need a
    system call the unprivileged units' filter refuses."""
    st = os.stat(target)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(target, mode)
    if gid is not None and st.st_gid != gid:
        try:
            os.chown(target, -1, gid)
        except OSError as e:
            _chgrp_refused(e, name if name is not None else str(target), group)


def _chgrp_refused(e: OSError, path: Path | str, group: str | None) -> None:
    """An NFS server that squashes root refuses chgrp: the file stays private (the mode
    is set first), and the refusal is said once per process and group."""
    if e.errno not in (errno.EPERM, errno.EINVAL):
        raise e
    key = f"{group}"
    if key not in _chgrp_failed:
        _chgrp_failed.add(key)
        log.warning("cannot give %s to group %s (%s): files there stay private to their owner",
                    path, group, e.strerror)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
