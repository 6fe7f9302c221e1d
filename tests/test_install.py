"""A clean install: the project installed with ``pip install`` (not editable) into an empty
virtual environment, then run only through that environment's ``virtwarden`` command, as
an operator would after ``pip install .``.

The venv sees neither the test host's Python packages nor this checkout's sources, so
what works here is proven to be declared in pyproject.toml (every import, also the ones
libraries make at run time) and shipped in the package (Alembic migrations, policy
examples). The venv is made once per test session; its tests share one xdist worker.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import virtwarden
from tests.conftest import need
from tests.guests import GuestFactory
from tests.harness import REPO, Installation, wait_for

pytestmark = pytest.mark.xdist_group("clean-install")

TOKEN = "install-" + secrets.token_hex(16)
# What the installed venv must not inherit: other Python code, and our settings (each test
# passes its own configuration file).
NOT_INHERITED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "VIRTWARDEN_CONFIG",
                 "VIRTWARDEN_DATABASE_URL", "VIRTWARDEN_BROKER_URL", "VIRTWARDEN_API_TOKEN")
# A copy of the checkout without what is not source (the host's .venv, build output, caches).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".testhost", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.pyc", ".pytest_cache", ".hypothesis", ".mypy_cache")
# Prints, as JSON, each module of our packages that fails to import and each one that is
# imported from somewhere other than the venv.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed, elsewhere = {}, []
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        try:
            module = importlib.import_module(info.name)
        except Exception as e:
            failed[info.name] = repr(e)
            continue
        if not (module.__file__ or "").startswith(sys.prefix):
            elsewhere.append(f"{info.name}: {module.__file__}")
print(json.dumps({"failed": failed, "elsewhere": elsewhere}))
"""
PACKAGES = ("virtwarden",)  # the one top-level name: the card's folders are installed inside it


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (pip's index settings included) minus NOT_INHERITED."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**env, **extra}


@dataclass(frozen=True)
class CleanInstall:
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def virtwarden(self) -> Path:
        return self.venv / "bin" / "virtwarden"

    def run(self, *args: str | Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """A program of the venv, from a directory that holds no sources (cwd is on sys.path)."""
        return subprocess.run([str(a) for a in args], cwd=self.venv, env=clean_env(**env), capture_output=True,
                              text=True, timeout=timeout)

    def cli(self, config: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.virtwarden, "--config", config, *args, timeout=timeout, **env)


@pytest.fixture(scope="session")
def clean_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanInstall]:
    root = tmp_path_factory.mktemp("clean-install")
    shutil.copytree(REPO, root / "source", ignore=NOT_SOURCE)
    install = CleanInstall(root / "venv")
    made = subprocess.run([sys.executable, "-m", "venv", str(install.venv)], cwd=root, env=clean_env(),
                          capture_output=True, text=True)
    need(made.returncode == 0, "python -m venv cannot make a virtual environment with pip"
                               f" (on Debian: apt install python3-venv): {made.stderr.strip()[-500:]}")
    pip = install.run(install.python, "-m", "pip", "install", "--quiet", root / "source", timeout=600)
    assert pip.returncode == 0, f"pip install into an empty venv failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}"
    yield install
    shutil.rmtree(root, ignore_errors=True)  # 150 MB


def write_config(path: Path) -> Path:
    """The smallest configuration: embedded defaults with a data directory of the test's own."""
    path.write_text(yaml.safe_dump({"data_dir": str(path.parent / "data")}))
    return path


# --- what was installed -------------------------------------------------------------------------

def test_the_clean_install_sees_no_package_of_the_test_host(clean_install: CleanInstall) -> None:
    assert "include-system-site-packages = false" in (clean_install.venv / "pyvenv.cfg").read_text()
    probe = clean_install.run(clean_install.python, "-c", "import pytest")
    assert probe.returncode != 0 and "No module named 'pytest'" in probe.stderr
    check = clean_install.run(clean_install.python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_module_of_the_clean_install_imports_from_the_venv(clean_install: CleanInstall) -> None:
    r = clean_install.run(clean_install.python, "-c", IMPORT_ALL, *PACKAGES)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"failed": {}, "elsewhere": []}
    # One name of ours in site-packages: no generic worker/ or tasks/ to collide with.
    site = next(clean_install.venv.glob("lib/python3*/site-packages"))
    ours = {p.name for p in site.iterdir() if p.name.startswith("virtwarden") or p.name in virtwarden.MAPPED}
    assert ours == {"virtwarden", "virtwarden-0.1.0.dist-info"}, ours


def test_the_clean_install_ships_the_catalog_migrations_and_the_policy_examples(clean_install: CleanInstall) -> None:
    r = clean_install.run(clean_install.python, "-c", "import virtwarden.catalog.store, virtwarden.policies as p;"
                          " print(virtwarden.catalog.store.MIGRATIONS); print(p.__path__[0])")
    assert r.returncode == 0, r.stderr
    migrations, policies = (Path(line) for line in r.stdout.split())
    assert migrations.is_relative_to(clean_install.venv)
    assert _names(migrations, "*") >= {"alembic.ini", "env.py", "script.py.mako"}
    assert _names(migrations / "versions", "*.py") == _names(REPO / "catalog/migrations/versions", "*.py")
    examples = policies / "examples"
    assert _names(examples, "*.yaml") == _names(REPO / "policies/examples", "*.yaml")
    valid = clean_install.run(clean_install.virtwarden, "policy", "validate", examples)
    assert valid.returncode == 0, valid.stdout + valid.stderr


def _names(directory: Path, pattern: str) -> set[str]:
    return {p.name for p in directory.glob(pattern)}


def test_a_postgresql_catalog_without_the_postgres_extra_says_to_install_it(clean_install: CleanInstall,
                                                                            tmp_path: Path) -> None:
    config = write_config(tmp_path / "virtwarden.yaml")
    r = clean_install.cli(config, "jobs", VIRTWARDEN_DATABASE_URL="postgresql+psycopg2://vw:secret@127.0.0.1:1/vw")
    assert r.returncode == 3, r.stderr
    assert "psycopg2 is not installed" in r.stderr and "pip install 'virtwarden[postgres]'" in r.stderr


# --- the daemons and a job ------------------------------------------------------------------------

class Daemon:
    """``virtwarden COMMAND`` of the clean install in its own process group, output in a log file."""

    def __init__(self, install: CleanInstall, config: Path, command: str, log: Path) -> None:
        self.command = command
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - the process's log, closed when it is stopped
        self.proc = subprocess.Popen(
            [str(install.virtwarden), "--config", str(config), "--log-level", "info", command],
            cwd=log.parent, env=clean_env(VIRTWARDEN_API_TOKEN=TOKEN), stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def text(self) -> str:
        return self.log.read_bytes().decode(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        def done() -> bool:
            if ready():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"virtwarden {self.command}: {what}: exited with {self.proc.returncode}\n"
                                     f"{self.text()[-4000:]}")
            return False

        wait_for(done, timeout, lambda: f"virtwarden {self.command}: {what}\n{self.text()[-4000:]}", poll=0.2)

    def wait_logged(self, needle: str, timeout: float = 60) -> None:
        self.wait_until(lambda: needle in self.text(), f"logs {needle!r}", timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


def http_get(url: str, token: str | None = None) -> tuple[int, object]:
    """Status and JSON body; (0, reason) while nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (urllib.error.URLError, ConnectionError) as e:
        return 0, str(e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(stack: ExitStack, install: CleanInstall, config: Path, command: str) -> Daemon:
    daemon = Daemon(install, config, command, config.parent / f"{command}.log")
    stack.callback(daemon.stop)
    return daemon


@pytest.mark.libvirt
@pytest.mark.celery
def test_the_clean_install_runs_worker_api_and_listener_and_backs_up_a_guest(
        clean_install: CleanInstall, vw: Installation, guest_factory: GuestFactory) -> None:
    api_url = f"http://127.0.0.1:{free_port()}"
    vw.extra["api"] = {"listen": api_url.removeprefix("http://")}
    config = vw.write_config()  # the test Redis database (flushed), local libvirtd, a directory target
    with ExitStack() as stack:
        worker = start(stack, clean_install, config, "worker")
        api = start(stack, clean_install, config, "api")
        listener = start(stack, clean_install, config, "listen")
        worker.wait_logged(" ready.")
        api.wait_until(lambda: http_get(f"{api_url}/healthz")[0] == 200, "answers /healthz")
        listener.wait_logged("host local: reconciled (first contact)")

        assert http_get(f"{api_url}/healthz") == (200, {"status": "ok", "catalog": "ok", "broker": "ok"})
        assert http_get(f"{api_url}/v1/jobs/none")[0] == 401
        assert http_get(f"{api_url}/v1/jobs/none", TOKEN)[0] == 404

        guest = guest_factory(disks=1, size_mib=16)
        backup = clean_install.cli(config, "backup", guest.name, "--wait", timeout=240)
        assert backup.returncode == 0, f"{backup.stdout}{backup.stderr}\n{worker.text()[-4000:]}"
        found = clean_install.cli(config, "backups", guest.name, "--json")
        assert [(p["level"], p["status"]) for p in json.loads(found.stdout)] == [("full", "complete")], found.stderr
        status, served = http_get(f"{api_url}/v1/domains/{guest.name}/restore-points", TOKEN)
        assert status == 200 and [p["status"] for p in served] == ["complete"]
        listener.wait_logged(f"domain.started of {guest.name} on host local")
