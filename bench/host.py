"""Facts about the machine a run happened on, and the page cache between measurements."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import libvirt


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=source,fstype,size,avail", str(path)],
                         capture_output=True, text=True).stdout.splitlines()
    if len(out) < 2:
        return "unknown"
    source, fstype, size, avail = out[1].split()
    return f"{fstype} on {source} ({int(size) >> 20} GiB, {int(avail) >> 20} GiB free)"


def facts(conn: libvirt.virConnect, workdir: Path) -> dict[str, str]:
    mem_kib = int(_first("/proc/meminfo", "MemTotal").split()[0])
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "libvirt": _version(conn.getLibVersion()),
        "qemu": _version(conn.getVersion()),
        "kvm": "yes (/dev/kvm)" if os.path.exists("/dev/kvm") else "no (TCG)",
        "filesystem": filesystem(workdir),
        "python": platform.python_version(),
        "boto3": _package("boto3"),
        "moto": _package("moto"),
        "load_average_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def commit(repo: Path) -> str:
    """The checkout's HEAD, and whether files outside bench/ and docs/ differ from it."""
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--", ".", ":!bench", ":!docs"],
                             capture_output=True, text=True).stdout.strip()
    return f"{head or 'unknown'}{' + uncommitted changes' if changed else ''}"


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def actual_size(image: Path) -> int:
    """Bytes the image occupies on disk, as ``qemu-img info -U`` reports (works while a
    guest holds the image open)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["actual-size"])
