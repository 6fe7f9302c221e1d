"""A PostgreSQL catalog that stops answering fails the call, in bounded time, instead of
holding it for ever: a server that accepted the connection and never answers, and a host
whose packets stop arriving under an open connection (an iptables DROP rule on the
loopback port of a proxy in front of the real server). Each probe runs in a process of
its own, so that without the fix the test fails on its timeout instead of hanging."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import need
from tests.faults import CuttableProxy
from tests.harness import REPO

# The probe shortens the limits (10 s and 30 s as shipped) to keep the test short.
SETUP = """
import json, sys, time
import virtwarden.catalog.reader as reader
reader.PG_CONNECT_SECONDS = 1
reader.PG_UNACKED_SECONDS = 2
from virtwarden.catalog import jobs
from virtwarden.catalog.store import Catalog
from virtwarden.errors import DatabaseUnavailable

def timed(fn):
    start = time.monotonic()
    try:
        fn()
        error = None
    except DatabaseUnavailable as e:
        error = str(e)
    return {"seconds": time.monotonic() - start, "error": error}
"""


def _probe(code: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SETUP + code], cwd=REPO, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_server_that_never_answers_fails_the_catalog_and_the_reader_in_time() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes each connection; nothing ever answers on it
    url = f"postgresql+psycopg2://virtwarden:secret@127.0.0.1:{silent.getsockname()[1]}/catalog"
    try:
        proc = _probe(f"""
url = {url!r}
print(json.dumps({{"reader": timed(lambda: reader.recent_jobs(url)),
                   "catalog": timed(lambda: jobs.recent(Catalog(url)))}}))
""")
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        silent.close()
    assert proc.returncode == 0, err
    found = json.loads(out)
    for path in ("reader", "catalog"):
        assert found[path]["error"] is not None, found
        assert "timeout expired" in found[path]["error"], found
        assert "secret" not in found[path]["error"]
        assert found[path]["seconds"] < 15, found


@contextmanager
def _dropped(port: int) -> Iterator[None]:
    """Packets to ``port`` on the loopback interface vanish, as to a host that went away."""
    rule = ["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


def test_a_server_gone_under_an_open_connection_fails_the_next_call_in_time(pg_schema_url: str) -> None:
    need(shutil.which("iptables") is not None, "iptables is not installed (scripts/testhost.sh installs it)")
    with CuttableProxy(5432) as proxy:
        url = proxy.url(pg_schema_url)
        proc = _probe(f"""
cat = Catalog({url!r})
jobs.recent(cat)  # the pool now holds an open connection
print("connected", flush=True)
sys.stdin.readline()
print(json.dumps(timed(lambda: jobs.recent(cat))), flush=True)
""")
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "connected", proc.stderr.read() if proc.stderr else ""
            with _dropped(proxy.port):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    found = json.loads(out)
    assert found["error"] is not None, found
    assert found["seconds"] < 30, found


def test_the_url_s_own_settings_win_and_an_old_libpq_gets_what_it_knows() -> None:
    from virtwarden.catalog.reader import pg_connect_args

    shipped = pg_connect_args([], 170000)
    assert shipped == {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                       "keepalives_count": 3, "tcp_user_timeout": 30000}
    assert "connect_timeout" not in pg_connect_args(["connect_timeout", "sslmode"], 170000)
    assert "tcp_user_timeout" not in pg_connect_args([], 110000)  # libpq 11 does not know it


def test_a_session_idle_in_its_transaction_is_ended_by_the_server(pg_schema_url):
    """The catalog's PostgreSQL sessions carry idle_in_transaction_session_timeout (300 s),
    unless the URL, the role or the server set one: a process stopped in the middle of a
    transaction does not hold its rows for ever (the fault itself is in test_takeover.py)."""
    from virtwarden.catalog.store import PG_IDLE_IN_TRANSACTION_SECONDS, Catalog

    def limit(url: str) -> str:
        cat = Catalog(url)
        try:
            with cat.engine.connect() as conn:
                return conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
        finally:
            cat.close()

    assert PG_IDLE_IN_TRANSACTION_SECONDS == 300
    assert limit(pg_schema_url) == "5min"
    assert limit(pg_schema_url + "%20-cidle_in_transaction_session_timeout%3D3000") == "3s"
