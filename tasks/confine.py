"""Where a restore may write, and how it creates what it writes.

Confinement (``confine``): a restore into a directory (``to_dir``) or a new domain's
images in a given directory (``disk_dir``) that the API or a runbook asked for must
land under one of ``restore.allowed_dirs``. The path is judged as the kernel will
resolve it: the nearest ancestor that exists is resolved with ``os.path.realpath``
(every symbolic link followed) and the part that does not exist yet is appended; a
``..`` anywhere is refused outright. The check is made when the request is planned and
again by the worker, on the directory it actually opened (``NewDir``), right before it
writes.

Creation (``NewDir``): every file a restore creates is made in the destination
directory opened once, by file descriptor, so no name on the way can be swapped for a
symbolic link between the check and the write:

- missing directories are created one component at a time (mode 0700, or 0711 where
  QEMU running as another user must reach the images of a new domain) and opened with
  ``O_NOFOLLOW``; the directory finally opened is checked again against the allowed
  roots through ``/proc/self/fd``;
- a restore into a directory needs a new or empty one;
- each file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, in a private
  staging directory (``.virtwarden-restore-<job>``, 0700) inside the destination; an
  image is written by qemu-img through ``/proc/self/fd/N`` (the file we created, never
  a name), fsynced, and only when every file is complete is each one given its final
  name with ``link()``, which never replaces an existing name and never follows a
  symbolic link there. A name that is taken (a file, a symbolic link, dangling or not)
  refuses the restore and nothing is overwritten;
- on failure, what this restore created is removed again: only the files whose inode
  is the one it created, and the directories it created, if empty. An attempt of the
  same job that starts again (its worker died) finds its staging directory by name and
  removes what the dead attempt left, including final names it had already linked
  (recognised by their inode), before it writes anything.

Disk targets (``check_target``) are used as file names (``vda.qcow2``,
``<name>-vda.qcow2``) and must be disk names libvirt gives.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence

from virtwarden.errors import DestinationRefused, RestoreRefused, UnsafeTarget, VirtwardenError

log = logging.getLogger(__name__)

FILE_MODE = 0o600
PRIVATE_DIR = 0o700
# The directories of a new domain's images: QEMU may run as another user (libvirt
# gives it the images themselves, not their directories), so it must be able to pass.
IMAGE_DIR = 0o711
STAGING_PREFIX = ".virtwarden-restore-"

# The disk names libvirt accepts (virDiskNameParse): a bus prefix and 1-4 letters.
TARGET = re.compile(r"(fd|hd|sd|vd|xvd|ubd)[a-z]{1,4}")  # whole names only: fullmatch

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_target(target: object, point_id: str) -> str:
    """``target`` when it is a disk name libvirt gives (vda, sdb, hdc, xvda, ...);
    UnsafeTarget otherwise: it is used as a file name and nothing is written."""
    if not isinstance(target, str) or not TARGET.fullmatch(target):
        raise UnsafeTarget(f"restore point {point_id}: disk target {target!r} is not a disk name libvirt gives "
                           "(vda, sdb, hdc, xvda, ...); it would be used as a file name, so nothing was written")
    return target


# --- confinement ----------------------------------------------------------------------------
def check_plain(path: str, what: str) -> None:
    """An absolute path without ``..`` or NUL: DestinationRefused otherwise."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise DestinationRefused(f"{what} must be an absolute path: {path!r} (nothing was created)")
    if ".." in path.split("/"):
        raise DestinationRefused(f"{what} {path!r} contains '..'; give the directory itself (nothing was created)")


def real_path(path: str) -> str:
    """Where ``path`` leads: the real path of its nearest existing ancestor (every
    symbolic link resolved, a dangling one to where it points) and the rest appended."""
    head, rest = path, []
    while not os.path.lexists(head):
        parent = os.path.dirname(head)
        if parent == head:
            break
        rest.append(os.path.basename(head))
        head = parent
    return os.path.join(os.path.realpath(head), *reversed(rest))


def under(real: str, roots: Iterable[str]) -> bool:
    """Whether the real path ``real`` is one of ``roots`` (resolved too) or below one."""
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def confine(path: str, roots: Sequence[str], what: str = "to_dir") -> str:
    """The real path of ``path`` when it is under one of ``roots`` (see the module
    docstring); DestinationRefused otherwise. Changes nothing."""
    check_plain(path, what)
    real = real_path(path)
    if not under(real, roots):
        allowed = ", ".join(roots) or "none: restore.allowed_dirs is empty"
        via = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
        raise DestinationRefused(f"{what} {path}{via} is outside the directories restores may write to "
                                 f"(restore.allowed_dirs: {allowed}); nothing was created")
    return real


def _plain_name(name: str) -> str:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UnsafeTarget(f"{name!r} is not a plain file name; nothing was written")
    return name


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- creation -------------------------------------------------------------------------------
class NewDir:
    """A restore's destination directory, opened for new files only (see the module
    docstring). ``roots``: the allowed roots it must be under, or None (a restore root
    started from the command line, or the worker's own scratch space). ``empty``: the
    directory must be new or empty (a restore into a directory). ``job_id`` names the
    staging directory. Use as a context manager; ``publish`` gives the staged files their
    names; ``discard`` removes everything this restore created."""

    def __init__(self, path: str, *, job_id: str, roots: Sequence[str] | None = None, what: str = "to_dir",
                 mode: int = PRIVATE_DIR, empty: bool = True) -> None:
        self.path, self.roots, self.what, self.mode, self.empty = path, roots, what, mode, empty
        self.staging_name = _plain_name(STAGING_PREFIX + job_id)
        self.fd: int | None = None
        self.staging_fd: int | None = None
        self._parents: list[int] = []  # fds of the directories above the ones we created
        self._made_dirs: list[tuple[int, str]] = []  # (parent fd, name), outermost first
        self._staged: dict[str, tuple[int, int]] = {}  # name -> (st_dev, st_ino)
        self._linked: list[str] = []

    # opening
    def __enter__(self) -> NewDir:
        try:
            self.open()
        except BaseException:
            self.discard()
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.discard()
        self.close()

    def open(self) -> None:
        if self.roots is not None:
            real = confine(self.path, self.roots, self.what)
        else:
            check_plain(self.path, self.what)
            real = real_path(self.path)
        head, missing = real, []
        while not os.path.lexists(head):
            missing.append(os.path.basename(head))
            head = os.path.dirname(head)
        fd = self._open_dir(head, None)
        for name in reversed(missing):
            made = self._mkdir(fd, name, os.path.join(head, name))
            child = self._open_dir(name, fd)
            if made:
                os.fchmod(child, self.mode)
                self._made_dirs.append((fd, name))
            self._parents.append(fd)
            fd, head = child, os.path.join(head, name)
        self.fd = fd
        where = _fd_path(fd)
        if self.roots is not None and not under(where, self.roots):
            raise DestinationRefused(f"{self.what} {self.path} led to {where} when it was opened, outside "
                                     f"restore.allowed_dirs ({', '.join(self.roots)}); nothing was written")
        self._clear_earlier_attempt()
        if self.empty:
            held = sorted(n for n in os.listdir(fd) if n != self.staging_name)
            if held:
                shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
                raise RestoreRefused(f"{self.path} already holds {shown}; choose a new or empty directory "
                                     "(nothing was changed)")
        self._mkdir(fd, self.staging_name, os.path.join(self.path, self.staging_name), private=True)
        self.staging_fd = self._open_dir(self.staging_name, fd)
        os.fchmod(self.staging_fd, PRIVATE_DIR)

    def _open_dir(self, name: str, parent: int | None) -> int:
        shown = name if parent is None else os.path.join(self.path, name)
        try:
            if parent is None:
                return os.open(name, _DIR_FLAGS)  # a real path: checked through the fd afterwards
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RestoreRefused(f"{shown} in {self.what} {self.path} is not a directory (a file or a "
                                     "symbolic link); nothing was created") from None
            raise VirtwardenError(f"cannot open restore directory {shown}: {e.strerror}") from e

    def _mkdir(self, parent: int, name: str, shown: str, *, private: bool = False) -> bool:
        try:
            os.mkdir(name, PRIVATE_DIR if private else self.mode, dir_fd=parent)
            return True
        except FileExistsError:
            if private:  # the staging directory is ours only if we made it now
                raise RestoreRefused(f"{shown} appeared while the restore started; nothing was written") from None
            return False  # opened with O_NOFOLLOW next: a symbolic link that appeared is refused there
        except OSError as e:
            raise VirtwardenError(f"cannot create restore directory {shown}: {e.strerror}") from e

    def _clear_earlier_attempt(self) -> None:
        """What an earlier attempt of this job left (it died): its staged files, and the
        final names it had linked to them already."""
        assert self.fd is not None
        try:
            old = os.open(self.staging_name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RestoreRefused(f"{os.path.join(self.path, self.staging_name)} is not this restore's "
                                 f"staging directory ({e.strerror}); nothing was written") from None
        try:
            for name in os.listdir(old):
                st = os.stat(name, dir_fd=old, follow_symlinks=False)
                self._unlink_if(self.fd, name, (st.st_dev, st.st_ino))
                os.unlink(name, dir_fd=old)
            os.rmdir(self.staging_name, dir_fd=self.fd)
        except OSError as e:
            raise VirtwardenError(f"cannot remove what an earlier attempt of this restore left in "
                                  f"{os.path.join(self.path, self.staging_name)}: {e.strerror}") from e
        finally:
            os.close(old)
        log.warning("restore into %s: removed what an earlier attempt of this job left", self.path)

    # writing
    def create(self, name: str) -> int:
        """A new file ``name`` (0600) in the staging directory, open for writing; it gets
        its name in the destination at ``publish``."""
        assert self.fd is not None and self.staging_fd is not None
        _plain_name(name)
        if name in self._staged:
            raise RestoreRefused(f"{name} would be written twice into {self.path}; nothing was overwritten")
        self._check_free(name)
        try:
            fd = os.open(name, _NEW_FILE, FILE_MODE, dir_fd=self.staging_fd)
        except OSError as e:
            raise VirtwardenError(f"cannot create {os.path.join(self.path, name)}: {e.strerror}") from e
        st = os.fstat(fd)
        self._staged[name] = (st.st_dev, st.st_ino)
        return fd

    def write_text(self, name: str, text: str) -> None:
        fd = self.create(name)
        try:
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_free(self, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else "a file")
        raise RestoreRefused(f"{os.path.join(self.path, name)} already exists ({what}); nothing is overwritten "
                                 "(nothing was changed)")

    def publish(self) -> list[str]:
        """Give every staged file its final name (never over an existing one), make it
        durable, remove the staging directory. Returns the final paths."""
        assert self.fd is not None and self.staging_fd is not None
        for name in self._staged:
            try:
                os.link(name, name, src_dir_fd=self.staging_fd, dst_dir_fd=self.fd, follow_symlinks=False)
            except FileExistsError:
                self._check_free(name)
                raise RestoreRefused(f"{os.path.join(self.path, name)} appeared while the restore ran; "
                                     "nothing is overwritten") from None
            except OSError as e:
                raise VirtwardenError(f"cannot name {os.path.join(self.path, name)}: {e.strerror}") from e
            self._linked.append(name)
        os.fsync(self.fd)
        for name in self._staged:
            os.unlink(name, dir_fd=self.staging_fd)
        os.close(self.staging_fd)
        self.staging_fd = None
        os.rmdir(self.staging_name, dir_fd=self.fd)
        os.fsync(self.fd)
        return [os.path.join(self.path, n) for n in self._staged]

    # undoing
    def discard(self) -> None:
        """Remove what this restore created (never raises: the original error matters)."""
        try:
            if self.fd is not None:
                for name in self._linked:
                    self._unlink_if(self.fd, name, self._staged[name])
                if self.staging_fd is not None:
                    for name in os.listdir(self.staging_fd):
                        os.unlink(name, dir_fd=self.staging_fd)
                    os.close(self.staging_fd)
                    self.staging_fd = None
                    os.rmdir(self.staging_name, dir_fd=self.fd)
            for parent, name in reversed(self._made_dirs):
                try:
                    os.rmdir(name, dir_fd=parent)
                except OSError:
                    break  # not empty (someone else's now) or gone
        except OSError as e:
            log.warning("cleaning up after a failed restore into %s: %s", self.path, e)
        self._linked.clear()
        self._made_dirs.clear()

    @staticmethod
    def _unlink_if(parent: int, name: str, ident: tuple[int, int]) -> None:
        """Unlink ``name`` only when it is the file we created (same inode)."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(name, dir_fd=parent)

    def close(self) -> None:
        for fd in (self.staging_fd, self.fd, *self._parents):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.staging_fd = self.fd = None
        self._parents = []

    def __repr__(self) -> str:
        return f"NewDir({self.path!r})"
