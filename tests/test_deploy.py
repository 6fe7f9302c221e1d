"""The shipped deployment is closed by default (issue 10, finding 7): the systemd units
run the API, listener and scheduler unprivileged and every unit hardened (measured with
``systemd-analyze security``), the API starts under the same restrictions, and
compose.yaml keeps MinIO on loopback with no fixed password and pinned images."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import need
from tests.harness import wait_for

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
API, WORKER = "virtwarden-api.service", "virtwarden-worker@.service"
LISTENER, SCHEDULER = "virtwarden-listener@.service", "virtwarden-scheduler.service"
# The goal for the API; the others must not be worse than "OK" (systemd's scale: < 4.5).
MAX_EXPOSURE = {API: 4.0, LISTENER: 4.0, SCHEDULER: 4.0, WORKER: 4.0}


def unit(name: str) -> dict[str, list[str]]:
    """The [Service] settings of a unit: each key with every value it is given."""
    found: dict[str, list[str]] = {}
    section = None
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def words(settings: dict[str, list[str]], key: str) -> set[str]:
    return {w for v in settings.get(key, []) for w in v.split()}


@pytest.mark.parametrize("name", [API, WORKER, LISTENER, SCHEDULER])
def test_every_unit_is_hardened(name):
    s = unit(name)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "UMask": "0077", "ProtectHome": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
                       "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "RestrictSUIDSGID": "yes", "Restart": "always"}.items():
        assert s.get(key) == [value], f"{name}: {key}={s.get(key)}"
    assert words(s, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in s["SystemCallFilter"]
    assert "/var/lib/virtwarden" in {p.lstrip("-") for p in words(s, "ReadWritePaths")}


@pytest.mark.parametrize("name", [API, LISTENER, SCHEDULER])
def test_daemons_that_need_no_root_run_without_it(name):
    s = unit(name)
    assert s["User"] == ["virtwarden"] and s["Group"] == ["virtwarden"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert s["PrivateDevices"] == ["yes"]


def test_the_api_has_no_libvirt_access_and_the_others_only_through_the_group():
    assert "SupplementaryGroups" not in unit(API)
    assert unit(API)["PrivateUsers"] == ["yes"]
    for name in (LISTENER, SCHEDULER):
        assert unit(name)["SupplementaryGroups"] == ["libvirt"]


def test_the_worker_is_root_with_only_the_file_capabilities():
    s = unit(WORKER)
    assert "User" not in s  # root: disk images, files libvirt writes, libvirtd with full rights
    assert words(s, "CapabilityBoundingSet") == {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER"}
    assert {p.lstrip("-") for p in words(s, "ReadWritePaths")} == {"/var/lib/virtwarden", "/var/lib/libvirt/images"}
    # A worker that stops for any reason, exit 0 included, is started again.
    assert s["Restart"] == ["always"] and s["KillSignal"] == ["SIGTERM"]


def exposure(name: str) -> float:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed (apt-get install systemd)")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", name], cwd=UNITS,
                       capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert found, r.stdout + r.stderr
    return float(found[1])


@pytest.mark.parametrize("name", [API, WORKER, LISTENER, SCHEDULER])
def test_systemd_measures_each_unit_at_most_4(name):
    assert exposure(name) <= MAX_EXPOSURE[name]


# --- the API under the unit's restrictions -----------------------------------------
def _sandbox_ready() -> None:
    need(os.geteuid() == 0, "running the API as another user needs root")
    for tool in ("unshare", "setpriv", "mount"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (util-linux)")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    need(probe.returncode == 0, f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")


MDWE = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes asks of the kernel
# (inherited across execve); a kernel without it (< 6.3) says EINVAL.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_the_api_serves_under_the_units_restrictions(redis_url):
    """systemd is not PID 1 on the test machines, so the unit's restrictions that matter
    for the code are applied by hand, as systemd would: the user virtwarden would be
    (nobody here, in the unit's group nogroup, with no other group), no capabilities and
    no new privileges, the file system read-only but the data directory (ProtectSystem=
    strict, ReadWritePaths), a private /tmp, home directories hidden, and no memory that
    is writable and executable (MemoryDenyWriteExecute: CPython and every library the
    API loads must do without). The catalog is SQLite, made by root as the worker would
    with ``security.service_group``; the API writes to it (a refused request's audit)."""
    _sandbox_ready()
    from virtwarden.catalog.store import Catalog

    from virtwarden import permissions

    base = Path(tempfile.mkdtemp(prefix="vw-sandbox-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o711)
        etc, data = base / "etc", base / "data"
        etc.mkdir(mode=0o750)
        os.chown(etc, 0, 65534)
        token = "t" * 40
        (etc / "api-token").write_text(f"prometheus:read:{token}\n")
        config = etc / "config.yaml"
        port = _free_port()
        config.write_text(yaml.safe_dump({
            "data_dir": str(data), "broker_url": redis_url, "hosts": {"local": {"uri": "qemu:///system"}},
            "security": {"service_group": "nogroup"},
            "api": {"token_file": str(etc / "api-token"), "listen": f"127.0.0.1:{port}"}}))
        for f in (config, etc / "api-token"):
            os.chown(f, 0, 65534)
            os.chmod(f, 0o640)
        saved = permissions.current()
        try:
            permissions.configure(service_group="nogroup")
            Catalog(f"sqlite:///{data / 'catalog.db'}").close()  # root makes it, as the worker would
        finally:
            permissions._policy = saved
        assert oct(os.stat(data).st_mode & 0o777) == "0o770" and os.stat(data / "catalog.db").st_gid == 65534

        # ProtectHome= hides /root and /home; an interpreter installed there (pyenv) is
        # put back at its own path, read-only, as if it lived in /usr.
        prefix = Path(sys.base_prefix)
        need(sys.prefix == sys.base_prefix or prefix.parts[1:2] not in (("root",), ("home",)),
             "a virtual environment over an interpreter in a home directory")
        homes = ["/root", "/home"]
        keep = Path(*prefix.parts[:3]) if prefix.parts[1:2] in (("root",), ("home",)) else None
        stash = base / "interpreter"
        hide = []
        for home in homes:
            if keep is not None and str(keep).startswith(home + "/"):
                hide += [f"mkdir -p {stash} && mount --bind {keep} {stash}",
                         f"mount -t tmpfs -o mode=755 tmpfs {home}",
                         f"mkdir -p {keep} && mount --bind -o ro {stash} {keep}",
                         f"mount -o remount,ro {home}"]
            else:
                hide.append(f"mount -t tmpfs -o ro,mode=755 tmpfs {home}")
        (base / "mdwe.py").write_text(MDWE)
        # PrivateTmp= gives the service an empty /tmp; a checkout under /tmp (the code the
        # unit would have installed under /usr) is put back at its own path, read-only.
        private_tmp = ["mount -t tmpfs -o mode=1777 tmpfs /tmp"]
        if REPO.resolve().parts[1:2] == ("tmp",):
            code = base / "code"
            code.mkdir()
            private_tmp = [f"mount --bind {REPO.resolve()} {code}", *private_tmp,
                           f"mkdir -p {REPO.resolve()} && mount --bind -o ro {code} {REPO.resolve()}"]
        script = "\n".join([
            "set -e",
            f"mount --bind {data} {data}",  # ReadWritePaths
            *hide,  # ProtectHome
            "mount --bind -o remount,ro /",  # ProtectSystem=strict
            *private_tmp,  # PrivateTmp
            f"cd {REPO}",
            f"exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs --bounding-set=-all "
            f"--inh-caps=-all -- {sys.executable} {base / 'mdwe.py'} {sys.executable} -m virtwarden.cli "
            f"--config {config} --log-level info api",
        ])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
               "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}
        log = base / "api.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_port(port, proc, log)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert re.search(r"^Uid:\s+65534\s", status, re.M) and re.search(r"^Groups:[ \t]*$", status, re.M)
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M)
            health = _get(port, "/healthz")
            assert health[0] == 200, health
            assert _get(port, "/metrics", token)[0] == 200
            assert _get(port, "/v1/jobs/no-such-job", token)[0] == 404
            refused = _post(port, "/v1/restores", token, {"domain": "web01", "to_dir": "/srv/x"})
            assert refused[0] == 403, refused  # a read token: refused, and the refusal audited
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(20)
        text = log.read_text()
        assert "Permission denied" not in text and "Traceback" not in text, text[-3000:]
        assert "holds" not in text, text[-3000:]  # the group-readable config is the service group's
        with Catalog(f"sqlite:///{data / 'catalog.db'}").session() as s:
            from sqlalchemy import text as sql

            assert s.execute(sql("SELECT count(*) FROM audit_log")).scalar() >= 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the API exited in its sandbox ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout, lambda: f"the API to listen in its sandbox:\n{log.read_text()[-3000:]}", poll=0.1)


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(port: int, path: str, token: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- compose.yaml --------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_publishes_nothing_beyond_loopback():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert str(spec).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_has_no_fixed_password_and_pinned_images():
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)):
            value = str(value)
            if re.search(r"PASSWORD|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}: {key} is not taken from the env file"
            userinfo = re.match(r"[A-Za-z][\w+.-]*://([^@/]*)@", value)
            if userinfo and ":" in userinfo[1]:
                assert userinfo[1].partition(":")[2].startswith("${"), f"{name}: {key} holds a literal password"
        image = service.get("image", "")
        if name in ("worker", "listener", "scheduler", "api"):
            continue  # built from this checkout
        assert image and not image.endswith(":latest") and (":" in image or "@sha256:" in image), image
        # A version (redis:7.2.5, minio/minio:RELEASE.2024-...), not a moving major tag.
        assert re.search(r":(\d+\.\d+\.\d+|\d+\.\d+$|RELEASE\.\d{4}-)", image) or "@sha256:" in image, \
            f"{name}: {image} is not pinned to a version"
    text = (REPO / "compose.yaml").read_text()
    assert "change-me" not in text and "POSTGRES_PASSWORD: virtwarden" not in text


def test_make_compose_env_generates_private_passwords_once(tmp_path):
    need(shutil.which("make") is not None and shutil.which("openssl") is not None, "make and openssl")
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "-s", "-C", str(tmp_path), "-f", str(REPO / "Makefile"), "compose-env"],
                              capture_output=True, text=True, timeout=60)
    assert run().returncode == 0
    env = tmp_path / ".env"
    first = env.read_text()
    values = dict(line.split("=", 1) for line in first.splitlines())
    assert set(values) == {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD"}
    assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in values.values()) and len(set(values.values())) == 2
    assert os.stat(env).st_mode & 0o777 == 0o600
    assert run().returncode == 0 and env.read_text() == first  # never overwritten


def test_compose_validates_and_refuses_to_start_without_its_passwords(tmp_path):
    """``docker-compose config`` (Debian's docker-compose, which the test bed installs: it
    resolves and checks a file without a Docker daemon), or ``docker compose config``."""
    tool = (["docker-compose"] if shutil.which("docker-compose") else
            ["docker", "compose"] if shutil.which("docker") and subprocess.run(
                ["docker", "compose", "version"], capture_output=True).returncode == 0 else None)
    need(tool is not None, "docker-compose (scripts/testhost.sh installs it) or the docker compose plugin")
    shutil.copy(REPO / "compose.yaml", tmp_path / "compose.yaml")
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PASSWORD")}
    config = lambda: subprocess.run([*tool, "-f", "compose.yaml", "config"], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    refused = config()
    assert refused.returncode != 0 and "run make compose-env first" in refused.stderr
    (tmp_path / ".env").write_text("MINIO_ROOT_PASSWORD=a1\nPOSTGRES_PASSWORD=b2\n")
    resolved = config()
    assert resolved.returncode == 0, resolved.stderr
    assert "virtwarden:b2@postgres:5432" in resolved.stdout and "127.0.0.1:9000:9000" in resolved.stdout
