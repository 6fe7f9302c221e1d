"""A real virtwarden installation for a test: configuration file, Redis broker, Celery
worker processes and the ``virtwarden`` command, all as an operator would run them.

A pytest plugin (listed in tests/conftest.py). ``vw`` gives a fresh data directory, an
SQLite catalog, a local-directory target ``nfs`` and, when asked, an ``s3`` target on
the moto endpoint; the Redis database used by tests is flushed before each test.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests import forkserver
from tests.conftest import need


def _own_database(url: str) -> str:
    """Each xdist worker (``-n 2``) gets its own Redis database, so its Celery workers
    consume only its own jobs (the queues are per database). db 13 is the listener tests'."""
    n = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    match = re.match(r"(.*/)(\d+)$", url)
    if n == 0 or not match:
        return url
    free = [db for db in range(int(match[2]), -1, -1) if db != 13]
    return f"{match[1]}{free[n]}"


REDIS_URL = _own_database(os.environ.get("VIRTWARDEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
PG_URL = os.environ.get("VIRTWARDEN_TEST_POSTGRES_URL",
                        "postgresql+psycopg2://virtwarden:virtwarden@127.0.0.1:5432/virtwarden_test")
REPO = Path(__file__).resolve().parent.parent

# Short leases so that a killed worker's job is taken over within seconds.
TEST_WORKER = {"lease_seconds": 4, "heartbeat_seconds": 1, "reap_seconds": 1, "max_attempts": 3,
               "retry_delay_seconds": 1, "concurrency": 1, "resend_seconds": 3, "sweep_seconds": 5}


def wait_for(predicate, timeout: float, what, poll: float = 0.05):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` ends.
    ``what`` names what is waited for in the error; a callable gives it then (the tail of
    a log, say). A predicate that knows the wait is hopeless (its process exited) raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")


@dataclass
class Cli:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


# Commands that run until stopped, or serve: always a process of their own.
DAEMONS = {"worker", "listen", "api", "scheduler", "demo"}


def run_cli_in_process(args: list[str], env: dict[str, str]) -> Cli:
    """``virtwarden ARGS`` as ``virtwarden.cli.main.main(ARGS)`` in this process, with ``env`` as
    its environment: stdout and stderr captured (the log lines too), the exit code
    returned (a SystemExit's as well). What main changes for its whole process is put
    back afterwards: the umask (0077), the environment, the root logger's handlers and
    level, the file-mode policy (security), the Celery app's configuration (cleared
    first, so that the command loads its own as a new process would). About 0.8 s less
    than a new interpreter, much more on a loaded host."""
    import io
    import logging
    from contextlib import redirect_stderr, redirect_stdout

    from virtwarden.worker import celery_app

    from virtwarden import permissions
    from virtwarden.cli import main as cli_module

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_stdin = dict(os.environ), sys.stdin
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_policy = permissions.current()
    broker_keys = ("broker_url", "broker_transport_options")  # what celery_app.configure sets per config
    saved_celery = celery_app._config, dict(celery_app._catalogs), {k: celery_app.app.conf.get(k) for k in broker_keys}
    celery_app._config = None
    celery_app._catalogs.clear()
    saved_umask = os.umask(0o077)
    os.umask(saved_umask)
    os.environ.clear()
    os.environ.update(env)
    root.handlers = []  # so that main's logging.basicConfig writes to the captured stderr
    sys.stdin = io.StringIO()  # as a child whose stdin is /dev/null
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli_module.main(args)
            except SystemExit as e:  # argparse: it has printed why
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = saved_stdin
        os.umask(saved_umask)
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        permissions._policy = saved_policy  # what configure() replaced
        for cat in celery_app._catalogs.values():
            cat.engine.dispose()
        celery_app._config, celery_app._catalogs = saved_celery[0], saved_celery[1]
        if celery_app.app.conf.get("broker_url") != saved_celery[2]["broker_url"]:
            celery_app._forget_broker_connections()  # pooled connections to the command's broker
        celery_app.app.conf.update(saved_celery[2])
    return Cli(code, out.getvalue(), err.getvalue())


class WorkerProcess:
    """``virtwarden worker`` in its own process group, its output in a log file."""

    def __init__(self, config: Path, log: Path, hosts: list[str], env: dict[str, str] | None = None) -> None:
        self.log = log
        args = ["--config", str(config), "--log-level", "info", "worker"]
        for h in hosts:
            args += ["--host", h]
        self.proc = forkserver.spawn(args, env={**os.environ, **(env or {})}, out=log)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if b" ready." in self.log.read_bytes():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return False

        wait_for(ready, timeout, lambda: f"the worker to start:\n{self.log.read_text()[-3000:]}", poll=0.1)

    def pause(self) -> None:
        """SIGSTOP the whole worker: every process and thread stops, lease renewal too."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a paused worker cannot stop
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Installation:
    root: Path
    storage: dict = field(default_factory=dict)
    hosts: dict = field(default_factory=lambda: {"local": {"uri": "qemu:///system"}})
    extra: dict = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    # cli() calls main() in the test process (run_cli_in_process) instead of starting
    # ``python -m virtwarden.cli``: set by the ``vw`` fixture for tests marked cli_in_process.
    cli_in_process: bool = False
    _calls: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def config_path(self) -> Path:
        return self.root / "virtwarden.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def scratch(self) -> Path:
        """The local host's scratch root: its ``scratch_dir``, else the data directory's."""
        return Path(self.hosts.get("local", {}).get("scratch_dir") or self.data_dir / "scratch")

    def write_config(self) -> Path:
        doc = {"data_dir": str(self.data_dir), "broker_url": REDIS_URL, "hosts": self.hosts,
               "storage": self.storage, "worker": TEST_WORKER, **self.extra}
        # Replaced whole, never rewritten in place: a worker or daemon starting while a test
        # calls the CLI must not read a half-written file (a worker that read an empty one
        # once exited and left a restore queued). Mode 600 from the start: it may hold
        # secrets (S3 keys), as an operator keeps it.
        fd, tmp = tempfile.mkstemp(dir=self.config_path.parent, prefix=".virtwarden.yaml.")
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config_path)
        return self.config_path

    def cli(self, *args: str, timeout: float = 300, in_process: bool | None = None,
            env: dict[str, str] | None = None) -> Cli:
        """``virtwarden ARGS`` with this installation's configuration, in a new process,
        or in this one when ``in_process`` (by default ``cli_in_process``) and ARGS name
        no daemon. ``timeout`` bounds a new process only; ``env`` is added to its
        environment (a fault point's, say)."""
        self.write_config()
        env = {**os.environ, "VIRTWARDEN_CONFIG": str(self.config_path), **(env or {})}
        env.pop("VIRTWARDEN_DATABASE_URL", None)
        env.pop("VIRTWARDEN_BROKER_URL", None)
        inline = self.cli_in_process if in_process is None else in_process
        command = next((a for a in args if not a.startswith("-")), "")
        if inline and (command not in DAEMONS or (command == "scheduler" and "--once" in args)):
            if "--wait" in args and "--timeout" not in args:  # bounded here too: no worker, no end
                args = (*args, "--timeout", str(timeout))
            return run_cli_in_process(list(args), env)
        n = next(self._calls)
        code, out, err = forkserver.run(list(args), env=env, out=self.root / f"cli-{n}.out",
                                        err=self.root / f"cli-{n}.err", timeout=timeout)
        return Cli(code, out, err)

    def start_worker(self, hosts: list[str] | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
        self.write_config()
        w = WorkerProcess(self.config_path, self.root / f"worker-{len(self.workers)}.log", hosts or [], env)
        self.workers.append(w)
        w.wait_ready()
        return w

    def catalog(self):
        from virtwarden.catalog.store import Catalog

        return Catalog(self.extra.get("database_url") or f"sqlite:///{self.data_dir / 'catalog.db'}")

    def storage_path(self, name: str) -> Path:
        """The directory of a local (nfs) storage target."""
        return Path(self.storage[name]["path"])

    def close(self, graceful: bool = True) -> None:
        """Stop the workers; ``graceful=False`` kills them (the fixture's end: nothing
        waits for an orderly Celery shutdown, about a second per worker)."""
        for w in self.workers:
            if graceful:
                w.stop()
            else:
                w.kill()
                w.stop()  # closes its log


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as e:  # noqa: BLE001
        need(False, f"Redis at {REDIS_URL} not reachable: {e}")
    return REDIS_URL


@pytest.fixture
def vw(request, tmp_path: Path, redis_url: str):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    inst = Installation(tmp_path, cli_in_process=request.node.get_closest_marker("cli_in_process") is not None)
    inst.storage["nfs"] = {"type": "nfs", "path": str(tmp_path / "repository"), "create": True}
    yield inst
    inst.close(graceful=False)
    redis.Redis.from_url(redis_url).flushdb()


# ``virtwarden key init`` options of keys that tests make: scrypt at 16 MiB opens the key
# file eight times faster than the default (128 MiB, about 0.3 s of a core per process).
FAST_KDF = ("--kdf-memory-mib", "16")


def add_format2_target(vw: Installation, name: str, kind: str, request, root: Path) -> None:
    """A format-2 storage target ``name`` (a directory under ``root``, or the S3 test
    bucket when ``kind`` is "s3") with a key file and passphrase file under ``root``
    (the key is not made: ``virtwarden key init``)."""
    secrets_dir = root / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    (secrets_dir / "pass").write_text("correct horse battery\n")
    if kind == "nfs":
        entry = {"type": "nfs", "path": str(root / name), "create": True}
    else:
        entry = s3_storage_entry(request.getfixturevalue("s3_settings"))
    vw.storage[name] = {**entry, "format": 2, "key_file": str(secrets_dir / f"{name}.key"),
                        "passphrase_file": str(secrets_dir / "pass")}


def s3_storage_entry(settings) -> dict:
    """The configuration-file form of a tests.s3server S3Storage."""
    return {k: v for k, v in settings.model_dump().items() if v is not None}


@pytest.fixture(params=["sqlite", "postgresql"])
def cat(request, tmp_path):
    """A new, empty catalog: once on SQLite, once on PostgreSQL (its own schema)."""
    from virtwarden.catalog.store import Catalog

    url = f"sqlite:///{tmp_path / 'catalog.db'}" if request.param == "sqlite" else \
        request.getfixturevalue("pg_schema_url")
    c = Catalog(url)
    yield c
    c.close()


@pytest.fixture
def pg_schema_url():
    """The URL of a fresh PostgreSQL schema for one test (dropped afterwards)."""
    import uuid

    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(PG_URL)
        schema = f"vw_{uuid.uuid4().hex[:10]}"
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as e:  # noqa: BLE001
        need(False, f"PostgreSQL at {PG_URL} not reachable: {e}")
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    engine.dispose()
