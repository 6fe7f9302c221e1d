"""One exception tree for the whole product.

Every error a user can cause or meet carries its message and a stable exit code, so the
CLI has exactly one place that turns an exception into text and a status. Errors from
libvirt, boto3, SQLAlchemy and Celery are converted once, where those libraries are
called, with ``raise ... from e``. ``Transient`` errors may succeed when retried
(a broker or endpoint that is down); the others will fail the same way again.
"""
from __future__ import annotations

# Exit codes (stable; scripts and runbooks may rely on them).
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed, or validation found errors
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)
EXIT_CONFIG = 3  # configuration file or policy unusable
EXIT_NOT_FOUND = 4  # unknown domain, restore point, storage name, job
EXIT_UNAVAILABLE = 5  # broker, database, libvirt or storage endpoint unreachable
EXIT_STORAGE = 6  # storage refused or lost data (checksum mismatch, disk full)
EXIT_HYPERVISOR = 7  # libvirt refused an operation
EXIT_BUG = 70  # an unexpected exception: a bug, please report it


class LeaseLost(BaseException):
    """This worker no longer owns the job: its lease ran out and another worker took the
    job over (its fencing token is newer), or the job ended meanwhile.

    Not an error to report but an order to stop: the job must change nothing more, not
    even to clean up, because what it would undo now belongs to its successor. Like
    ``asyncio.CancelledError`` it derives from BaseException, so that no
    ``except Exception`` on the way up can swallow it; the runner catches it.
    """


class VirtwardenError(Exception):
    """Base of every error the product raises on purpose."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Transient(VirtwardenError):
    """The same call may succeed later (network, broker, a busy resource)."""

    exit_code = EXIT_UNAVAILABLE


# --- configuration and input -------------------------------------------------------
class UsageError(VirtwardenError):
    """A request that contradicts itself (e.g. evacuating a host onto itself)."""

    exit_code = EXIT_USAGE


class ConfigError(VirtwardenError):
    exit_code = EXIT_CONFIG


class PolicyError(ConfigError):
    pass


class NotFound(VirtwardenError):
    exit_code = EXIT_NOT_FOUND


class DomainNotFound(NotFound):
    pass


class RestorePointNotFound(NotFound):
    pass


class JobNotFound(NotFound):
    pass


class UnknownStorage(NotFound):
    pass


class UnknownHost(NotFound):
    pass


# --- services ------------------------------------------------------------------------
class Unavailable(Transient):
    """A service we depend on cannot be reached."""


class BrokerUnavailable(Unavailable):
    pass


class DatabaseUnavailable(Unavailable):
    pass


class HypervisorUnavailable(Unavailable):
    pass


class StorageUnavailable(Unavailable):
    pass


# --- storage -------------------------------------------------------------------------
class StorageError(VirtwardenError):
    exit_code = EXIT_STORAGE


class ChecksumMismatch(StorageError):
    pass


class VerificationFailed(ChecksumMismatch):
    """A verification found stored data missing, changed or unreadable. ``result`` is
    its whole report, recorded as the failed job's result."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


class ObjectNotFound(StorageError):
    exit_code = EXIT_NOT_FOUND


class InvalidName(StorageError):
    pass


class NoSpace(StorageError):
    pass


class LockHeld(Transient):
    """Someone else holds the domain: another job is still changing it."""


# --- hypervisor and jobs -------------------------------------------------------------
class HypervisorError(VirtwardenError):
    exit_code = EXIT_HYPERVISOR


class BackupUnsupported(HypervisorError):
    pass


class CheckpointMissing(HypervisorError):
    """The checkpoint an incremental needs is gone; the chain must restart with a full."""


class QuiesceFailed(HypervisorError):
    """quiesce: always, and the guest's filesystems could not be frozen."""


class AgentUnresponsive(HypervisorError):
    """The guest agent did not answer in time: a request may still reach it later."""


class RestoreRefused(VirtwardenError):
    """The restore cannot be done as asked (a name or file already exists, the point does
    not fit the domain); nothing was changed."""


class DestinationRefused(RestoreRefused):
    """A restore's destination is outside the directories it may write to
    (``restore.allowed_dirs``, judged after symbolic links are resolved), or not a plain
    absolute path; nothing was created."""


class UnsafeTarget(RestoreRefused):
    """A disk target that is not a disk name libvirt gives (vda, sdb, ...): it would be
    used as a file name, so the restore writes nothing."""


class JobFailed(VirtwardenError):
    """A job ran and failed; the message is the job's recorded error."""


class ToolFailed(VirtwardenError):
    """An external tool (qemu-img) exited non-zero."""
