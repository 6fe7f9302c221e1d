"""``virtwarden doctor``: what this host needs, checked one by one, said plainly."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtwarden.config import Config
from virtwarden.errors import VirtwardenError

MIN_LIBVIRT = (7, 2, 0)  # push-mode backups with checkpoints are dependable from here


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def run_checks(cfg: Config) -> list[Check]:
    checks: list[Callable[[Config], list[Check]]] = [
        _kvm, _qemu_img, _libvirt, _database, _broker, _storage, _scratch, _permissions]
    out: list[Check] = []
    for check in checks:
        try:
            out += check(cfg)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
            out.append(Check(check.__name__.strip("_"), False, f"check crashed: {e}"))
    return out


def _kvm(_cfg: Config) -> list[Check]:
    """KVM is what makes guests fast; without it libvirt still runs them under TCG."""
    usable = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flag = "vmx" if " vmx" in cpuinfo else "svm" if " svm" in cpuinfo else None
    if usable:
        detail = "/dev/kvm usable" + (f" (CPU flag {flag})" if flag else " (nested: the CPU flag is hidden)")
    elif flag:
        detail = f"CPU has {flag} but /dev/kvm is missing or not accessible: load kvm_intel/kvm_amd"
    else:
        detail = "no hardware virtualization: guests run under TCG (type='qemu'), slowly"
    return [Check("hardware virtualization (KVM)", usable, detail, required=False)]


def _qemu_img(cfg: Config) -> list[Check]:
    """qemu-img for every backup and restore; qemu-nbd where a target is of format 2 (a
    shut-off domain's disks are read through its read-only export)."""
    out = []
    format2 = sorted(name for name, st in cfg.storage.items() if st.format == 2)
    for tool, required in (("qemu-img", True), ("qemu-nbd", bool(format2))):
        if not shutil.which(tool):
            why = f"; format-2 targets ({', '.join(format2)}) read shut-off domains with it" if format2 else ""
            out.append(Check(tool, False, f"not installed (Debian: apt-get install qemu-utils){why}", required))
            continue
        version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()
        out.append(Check(tool, True, version[0] if version else "installed", required))
    return out


def _libvirt(cfg: Config) -> list[Check]:
    try:
        from virtwarden.hypervisor import connect
    except ImportError as e:
        return [Check("libvirt-python", False, f"cannot import libvirt: {e} (pip install libvirt-python)")]
    out = []
    for name, host in cfg.hosts.items():
        try:
            with connect(name, host.uri) as hv:
                v = hv.version()
        except VirtwardenError as e:
            out.append(Check(f"libvirt on {name}", False, str(e)))
            continue
        new_enough = tuple(int(x) for x in v.libvirt.split(".")) >= MIN_LIBVIRT
        out.append(Check(f"libvirt on {name}", new_enough,
                         f"libvirt {v.libvirt}, QEMU {v.hypervisor}, domain types {', '.join(v.virt_types)}"
                         + ("" if new_enough else f"; need libvirt >= {'.'.join(map(str, MIN_LIBVIRT))}")))
        out.append(Check(f"backup API on {name}", v.backup_api,
                         "libvirt reports <backup supported='yes'/>" if v.backup_api else
                         "not supported: the bitmap strategy needs libvirt's backup API (use blockcommit)"))
    return out


def _database(cfg: Config) -> list[Check]:
    from virtwarden.catalog.store import Catalog, mask

    try:
        Catalog(cfg.catalog_url).close()
        return [Check("catalog database", True, mask(cfg.catalog_url))]
    except VirtwardenError as e:
        return [Check("catalog database", False, str(e))]


def _broker(cfg: Config) -> list[Check]:
    from virtwarden.worker import celery_app

    celery_app.configure(cfg)
    try:
        celery_app.check_broker(cfg)
        return [Check("broker", True, celery_app.mask(cfg.broker_url))]
    except VirtwardenError as e:
        return [Check("broker", False, str(e))]


def _storage(cfg: Config) -> list[Check]:
    from virtwarden.storage_backends import open_backend

    out = []
    for name, settings in cfg.storage.items():
        backend = open_backend(name, settings)
        try:
            backend.check()
            out.append(Check(f"storage {name}", True, backend.describe()))
        except VirtwardenError as e:
            out.append(Check(f"storage {name}", False, str(e)))
        finally:
            backend.close()
    return out


def _scratch(cfg: Config) -> list[Check]:
    out = []
    for name in cfg.hosts:
        path = cfg.scratch_dir(name)
        try:
            path.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            out.append(Check(f"scratch on {name}", True, f"{path}: {free / 2**30:.1f} GiB free"))
        except OSError as e:
            out.append(Check(f"scratch on {name}", False, f"{path}: {e.strerror}"))
    return out


ENV_FILE = Path("/etc/virtwarden/env")  # the systemd units' EnvironmentFile


def _permissions(cfg: Config) -> list[Check]:
    """Files holding secrets readable by other users, and repositories or a catalog
    that other users can read (warnings: virtwarden uses them anyway)."""
    from virtwarden import permissions

    secret_files: list[tuple[str, Path | str]] = []
    if cfg.file_secrets:
        secret_files.append((", ".join(cfg.file_secrets), cfg.source))
    if cfg.api.token_file:
        secret_files.append(("API tokens", cfg.api.token_file))
    if cfg.api.hmac_key_file:
        secret_files.append(("the API's HMAC key", cfg.api.hmac_key_file))
    if ENV_FILE.is_file():
        secret_files.append(("the services' environment (systemd EnvironmentFile)", ENV_FILE))
    out = []
    for what, path in secret_files:
        try:
            reason = permissions.exposure(path)
        except OSError as e:
            out.append(Check(f"permissions of {path}", False, f"cannot stat: {e.strerror}", required=False))
            continue
        out.append(Check(f"permissions of {path}", reason is None,
                         f"holds {what}: " + (f"{reason}; {permissions.advice(path)}" if reason else "private"),
                         required=False))
    places: list[tuple[str, Path]] = [(f"storage {n}", Path(st.path)) for n, st in cfg.storage.items()
                                      if st.type == "nfs"]
    if not cfg.database_url:
        places.append(("catalog", Path(cfg.catalog_url.split("///", 1)[-1])))
    for what, path in places:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue  # the storage and catalog checks say why
        if mode & 0o004:
            out.append(Check(f"permissions of {what}", False,
                             f"{path} is readable by every local user (mode {mode:04o}): "
                             f"chmod -R go-rwx {path} (new files are private already)", required=False))
        else:
            out.append(Check(f"permissions of {what}", True, f"{path}: mode {mode:04o}", required=False))
    return out
