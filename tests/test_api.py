"""The HTTP API through a real server: ``virtwarden api`` started as an operator would,
spoken to over HTTP, with a real Celery worker and real guests where a restore runs."""
from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import forkserver
from tests.guests import images_equal
from tests.harness import REPO, wait_for
from virtwarden.api.auth import sign

pytestmark = pytest.mark.cli_in_process  # the CLI in the test process; daemons still run apart

MiB = 1024 * 1024
TOKEN = "hook-" + secrets.token_hex(16)
OTHER = "ops-" + secrets.token_hex(16)
KEY = secrets.token_hex(32).encode()


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class ApiServer:
    """``python -m virtwarden.cli api`` in its own process group, its output in a log file."""

    config: Path
    log: Path
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **self.env}
        for name in ("VIRTWARDEN_CONFIG", "VIRTWARDEN_DATABASE_URL", "VIRTWARDEN_BROKER_URL", "VIRTWARDEN_API_TOKEN"):
            if name not in self.env:
                env.pop(name, None)
        self.proc = forkserver.spawn(["--config", str(self.config), "--log-level", "info",
                                      "api", "--listen", f"127.0.0.1:{self.port}"], env=env, out=self.log)

    def wait_ready(self, timeout: float = 60) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"API exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, timeout, lambda: f"the API to listen:\n{self.log.read_text()[-3000:]}", poll=0.1)

    def call(self, method: str, path: str, body: object = None, *, token: str | None = TOKEN,
             raw: bytes | None = None, headers: dict | None = None, signed: int | None = None,
             declared: int | None = None) -> Reply:
        """``signed``: sign the body with a timestamp this many seconds old. ``declared``:
        send only headers that announce a body of this many bytes."""
        data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json"} if data is not None else {}
        if token:
            h["Authorization"] = f"Bearer {token}"
        if signed is not None:
            h["X-Virtwarden-Signature"] = sign(KEY, data or b"", int(time.time()) - signed)
        h.update(headers or {})
        conn = http.client.HTTPConnection(self.url.split("//", 1)[1], timeout=60)
        try:
            if declared is None:
                conn.request(method, path, body=data, headers=h)
            else:  # only the headers, as a client waiting for 100-continue would send them
                conn.putrequest(method, path)
                for k, v in {**h, "Content-Type": "application/json", "Content-Length": str(declared)}.items():
                    conn.putheader(k, v)
                conn.endheaders()
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM and wait for uvicorn's orderly shutdown, or (``graceful=False``, the
        fixture's end) SIGKILL: about 0.4 s less per server."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(vw, tmp_path):
    """Starts API servers on ``vw``'s installation: ``api(hmac=..., **api_settings)``."""
    servers: list[ApiServer] = []
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"# callers of the API\nalertmanager:{TOKEN}\n\n{OTHER}\n")
    tokens.chmod(0o600)
    key = tmp_path / "api-hmac-key"
    key.write_bytes(KEY + b"\n")

    def start(*, hmac: bool = False, env: dict | None = None, **settings) -> ApiServer:
        vw.extra["api"] = {"token_file": str(tokens), **settings}
        if hmac:
            vw.extra["api"]["hmac_key_file"] = str(key)
        server = ApiServer(vw.write_config(), tmp_path / f"api-{len(servers)}.log", env or {})
        servers.append(server)
        server.wait_ready()
        return server

    start.tokens = tokens  # type: ignore[attr-defined]
    yield start
    for s in servers:
        s.stop(graceful=False)


def _catalog(vw):
    """The catalog the API server uses (SQLite under the data dir, or the configured URL)."""
    from virtwarden.catalog.store import Catalog

    return Catalog(vw.extra["database_url"]) if "database_url" in vw.extra else vw.catalog()


def _rows(vw, model) -> list:
    from sqlalchemy import select

    cat = _catalog(vw)
    try:
        with cat.session() as s:
            return list(s.scalars(select(model)))
    finally:
        cat.close()


def _jobs(vw) -> list:
    from virtwarden.catalog.models import Job

    return _rows(vw, Job)


def _audit(vw) -> list:
    from virtwarden.catalog.models import AuditRecord

    return _rows(vw, AuditRecord)


def _alerts(vw) -> list:
    from virtwarden.catalog.models import Alert

    return _rows(vw, Alert)


def _alertmanager(status: str, *, fingerprint: str = "3f2a9c0d1e4b5a67", ends: str = "0001-01-01T00:00:00Z") -> dict:
    alert = {"status": status, "labels": {"alertname": "HostDiskFailing", "host": "local", "severity": "critical"},
             "annotations": {"summary": "SMART errors on /dev/sda"},
             "startsAt": "2026-11-27T02:14:05.123456789Z", "endsAt": ends,
             "generatorURL": "http://prometheus.example/graph", "fingerprint": fingerprint}
    return {"version": "4", "groupKey": '{}:{alertname="HostDiskFailing"}', "truncatedAlerts": 0,
            "status": status, "receiver": "virtwarden", "groupLabels": {"alertname": "HostDiskFailing"},
            "commonLabels": alert["labels"], "commonAnnotations": alert["annotations"],
            "externalURL": "http://alertmanager.example", "alerts": [alert]}


def _follow(server: ApiServer, job_id: str, timeout: float = 300) -> dict:
    def ended() -> dict | None:
        job = server.call("GET", f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed") else None

    return wait_for(ended, timeout, f"job {job_id} to end", poll=0.25)


# --- authentication ------------------------------------------------------------------------
def test_requests_without_a_valid_token_get_401_and_change_nothing(vw, api):
    server = api()
    payload = _alertmanager("firing")
    restore = {"domain": "web01", "to_dir": "/srv/restore/web01"}
    for token, headers in [(None, {}), ("not-a-known-token-at-all", {}), (None, {"Authorization": f"Basic {TOKEN}"}),
                           (TOKEN[:-1], {}), (TOKEN + "x", {})]:
        r = server.call("POST", "/v1/alerts", payload, token=token, headers=headers)
        assert r.status == 401, r.body
        assert "error" in r.json() and r.headers["www-authenticate"].startswith("Bearer")
        assert server.call("POST", "/v1/restores", restore, token=token, headers=headers).status == 401
        assert server.call("GET", "/v1/jobs/anything", token=token, headers=headers).status == 401
        assert server.call("GET", "/v1/domains/web01/restore-points", token=token, headers=headers).status == 401
    assert _alerts(vw) == [] and _jobs(vw) == []
    assert _audit(vw) == []  # counted in a metric instead (tests/test_api_least_privilege.py)

    # Both tokens of the file work; the named one is named in the audit log.
    assert server.call("POST", "/v1/alerts", payload).status == 200
    assert server.call("GET", "/v1/domains/web01/restore-points", token=OTHER).json() == []
    accepted = [a for a in _audit(vw) if a.outcome != "refused"]
    assert [(a.actor, a.action, a.target) for a in accepted] == [("api:alertmanager", "api.alerts", "virtwarden")]


def test_a_changed_token_file_takes_effect_without_a_restart(vw, api):
    server = api()
    assert server.call("GET", "/v1/jobs/x").status == 404
    new = "rotated-" + secrets.token_hex(16)
    api.tokens.write_text(f"alertmanager:{new}\n")
    assert server.call("GET", "/v1/jobs/x").status == 401
    assert server.call("GET", "/v1/jobs/x", token=new).status == 404
    api.tokens.write_text("alertmanager:short\n")  # invalid: nobody is let in until it is fixed
    assert server.call("GET", "/v1/jobs/x", token=new).status == 401
    assert "token shorter than 16 characters" in (server.log.read_text())


def test_the_api_refuses_to_start_without_a_token(vw, tmp_path, monkeypatch):
    monkeypatch.delenv("VIRTWARDEN_API_TOKEN", raising=False)
    vw.extra["api"] = {}
    vw.write_config()
    r = vw.cli("api", "--listen", f"127.0.0.1:{_free_port()}", timeout=60)
    assert r.code == 3, r.err
    assert "needs at least one bearer token" in r.err and "api.token_file" in r.err
    vw.extra["api"] = {"token_file": str(tmp_path / "missing")}
    r = vw.cli("api", "--listen", f"127.0.0.1:{_free_port()}", timeout=60)
    assert r.code == 3 and "api.token_file" in r.err and "missing" in r.err


def test_a_token_from_the_environment_is_enough(vw, tmp_path):
    vw.extra["api"] = {}
    env_token = "env-" + secrets.token_hex(16)
    server = ApiServer(vw.write_config(), tmp_path / "api.log", {"VIRTWARDEN_API_TOKEN": env_token})
    try:
        server.wait_ready()
        assert server.call("GET", "/v1/jobs/x", token=env_token).status == 404
        assert server.call("GET", "/v1/jobs/x", token=TOKEN).status == 401
    finally:
        server.stop()


# --- signatures ----------------------------------------------------------------------------
def test_signature_checks_without_a_server():
    from virtwarden.api.auth import Refused, Signatures

    sigs = Signatures(KEY, 300, ("restores",))
    body = b'{"domain": "web01"}'
    header = sign(KEY, body, 1_800_000_000)
    assert sigs.check(header, body, 1_800_000_000 + 299)[1] == 1_800_000_000
    assert sigs.check(header.upper().replace("T=", "t=").replace("V1=", "v1="), body, 1_800_000_000)
    for bad, now, why in [(header, 1_800_000_000 + 301, "tolerance"), (header + "0", 1_800_000_000, "malformed"),
                          ("t=soon," + header.split(",")[1], 1_800_000_000, "malformed"),
                          (sign(KEY, body + b" ", 1_800_000_000), 1_800_000_000, "does not match")]:
        with pytest.raises(Refused, match=why):
            sigs.check(bad, body, now)
    assert sigs.required("POST", "/v1/restores") and sigs.required("POST", "/v1/restores/")
    assert not sigs.required("POST", "/v1/alerts") and not sigs.required("GET", "/v1/restores")


def test_token_file_and_listen_parsing(tmp_path):
    from virtwarden.api.app import parse_listen
    from virtwarden.api.auth import Tokens, parse_tokens
    from virtwarden.errors import ConfigError

    text = f"# comment\n\nam:{TOKEN}\n{OTHER}\n  ops.team@site-1 : {TOKEN}x \n"
    assert [(t.caller.name, t.token) for t in parse_tokens(text, "f")] == [
        ("am", TOKEN), ("token-4", OTHER), ("ops.team@site-1", f"{TOKEN}x")]
    with pytest.raises(ConfigError, match="f:2: token shorter than 16"):
        parse_tokens("# c\nam:short\n", "f")
    with pytest.raises(ConfigError, match="f:2: caller name 'am' used twice"):
        parse_tokens(f"am:{TOKEN}\nam:{OTHER}\n", "f")
    path = tmp_path / "tokens"
    path.write_text(f"am:{TOKEN}\n")
    tokens = Tokens(str(path), env_token=OTHER)
    assert (tokens.identify(TOKEN).name, tokens.identify(OTHER).name) == ("am", "env")
    assert (tokens.identify(TOKEN[:-1]), tokens.identify("")) == (None, None)
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8080", "host:", "host:0", "host:http", ":80"):
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            parse_listen(bad)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_signed_bodies_good_forged_stale_and_replayed(vw, api, database, request):
    if database == "postgresql":  # a fleet's API processes share a PostgreSQL catalog
        vw.extra["database_url"] = request.getfixturevalue("pg_schema_url")
    server = api(hmac=True, signed_endpoints=["restores", "alerts"])
    second = api(hmac=True, signed_endpoints=["restores", "alerts"])  # another API process on the same catalog
    body = json.dumps(_alertmanager("firing")).encode()
    now = int(time.time())

    def post(target: ApiServer, signature: str | None, data: bytes = body) -> Reply:
        headers = {"X-Virtwarden-Signature": signature} if signature else {}
        return target.call("POST", "/v1/alerts", raw=data, headers=headers)

    good = sign(KEY, body, now)
    refusals = {
        "missing": post(server, None),
        "forged": post(server, sign(b"not-the-key-" * 4, body, now)),
        "other body": post(server, good, body.replace(b"firing", b"resolved")),
        # A minute beyond the tolerance either way: the requests before this one take
        # time, which would bring a timestamp only just in the future back inside it.
        "stale": post(server, sign(KEY, body, now - 360)),
        "future": post(server, sign(KEY, body, now + 360)),
        "malformed": post(server, f"v1={good.split('v1=')[1]}"),
    }
    for what, r in refusals.items():
        assert r.status == 401, (what, r.body)
    assert "missing X-Virtwarden-Signature" in refusals["missing"].json()["error"]
    assert "does not match" in refusals["forged"].json()["error"]
    assert "tolerance 300 s" in refusals["stale"].json()["error"]
    assert _alerts(vw) == []

    assert post(server, good).status == 200
    replay_same, replay_other = post(server, good), post(second, good)
    assert replay_same.status == replay_other.status == 401
    assert "used before" in replay_other.json()["error"]
    assert len(_alerts(vw)) == 1
    # A request signed afresh (a later timestamp) is a new request, not a replay.
    assert post(second, sign(KEY, body, now - 1)).status == 200
    # Refused signatures are counted, not audited: only the two accepted deliveries are.
    assert [a.outcome for a in _audit(vw)] == ["succeeded", "succeeded"]
    # Reads are not signed; a restore POST is refused before anything is looked up.
    assert server.call("GET", "/v1/domains/x/restore-points").status == 200
    r = server.call("POST", "/v1/restores", {"domain": "x", "to_dir": "/tmp/x"})
    assert r.status == 401 and _jobs(vw) == []


def test_alerts_are_not_signed_by_default_so_alertmanager_works_with_a_key(vw, api):
    """Alertmanager cannot sign: with an HMAC key and the default ``signed_endpoints``
    its posts pass on the token alone, while a signature that is present is still
    checked, and restores must be signed."""
    server = api(hmac=True)
    assert server.call("POST", "/v1/alerts", _alertmanager("firing")).status == 200
    forged = server.call("POST", "/v1/alerts", _alertmanager("firing", fingerprint="ff"),
                         headers={"X-Virtwarden-Signature": f"t={int(time.time())},v1={'0' * 64}"})
    assert forged.status == 401
    assert server.call("POST", "/v1/restores", {"domain": "x", "to_dir": "/tmp/x"}).status == 401


# --- input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,field,message", [
    ("/v1/restores", b'{"domain": "web01", "to_dir": ', "body", "not valid JSON"),
    ("/v1/restores", b'["web01"]', "body", "valid dictionary"),
    ("/v1/restores", b'{"to_dir": "/srv/r"}', "domain", "Field required"),
    ("/v1/restores", b'{"domain": "web01"}', "body", "exactly one of to_dir, as_domain, in_place"),
    ("/v1/restores", b'{"domain": "web01", "to_dir": "srv/r"}', "to_dir", "absolute"),
    ("/v1/restores", b'{"domain": "web01", "to_dir": "/srv/../etc"}', "to_dir", "absolute"),
    ("/v1/restores", b'{"domain": "web01", "to_dir": "/r", "pont": "latest"}', "pont", "Extra inputs"),
    ("/v1/restores", b'{"domain": "web01", "to_dir": "/r", "at": "2026-11-27T02:00:00"}', "at", "timezone"),
    ("/v1/restores", b'{"domain": "web01", "to_dir": "/r", "point": "p", "at": "2026-11-27T02:00:00Z"}',
     "body", "point or at, not both"),
    ("/v1/alerts", b'{"version": "3"}', "version", "'4'"),
    ("/v1/alerts", None, "alerts.0.fingerprint", "Field required"),
    ("/v1/alerts", None, "alerts", "at least 1 item"),
])
def test_malformed_bodies_get_422_naming_the_field(vw, api, path, body, field, message):
    server = api()
    if body is None:  # variations of a valid Alertmanager payload
        payload = _alertmanager("firing")
        if field == "alerts":
            payload["alerts"] = []
        else:
            del payload["alerts"][0]["fingerprint"]
        body = json.dumps(payload).encode()
    r = server.call("POST", path, raw=body)
    assert r.status == 422, r.body
    reply = r.json()
    assert any(f["field"] == field and message in f["message"] for f in reply["fields"]), reply
    assert field in reply["error"]
    assert _jobs(vw) == [] and _alerts(vw) == []
    [record] = _audit(vw)
    assert (record.outcome, record.actor) == ("refused", "api:alertmanager") and field in record.detail


def test_other_input_errors(vw, api):
    server = api()
    r = server.call("POST", "/v1/restores", raw=b'{"domain": "web01", "to_dir": "/r"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415 and "Content-Type: application/json" in r.json()["error"]
    r = server.call("POST", "/v1/restores", {"domain": "web01", "to_dir": "/r"}, headers={"Idempotency-Key": "a b"})
    assert r.status == 422 and r.json()["fields"][0]["field"] == "Idempotency-Key header"
    r = server.call("POST", "/v1/restores", {"domain": "no-such-domain", "to_dir": str(vw.data_dir / "restores")})
    assert r.status == 404 and "no complete restore point" in r.json()["error"]
    r = server.call("GET", "/v1/jobs/no-such-job")
    assert r.status == 404 and r.json() == {"error": "no job 'no-such-job'"}
    r = server.call("POST", "/v1/alerts", declared=1024 * 1024 + 1)  # refused before a byte of it is read
    assert r.status == 413 and "api.max_body_bytes" in r.json()["error"]
    assert _jobs(vw) == []
    assert [a.outcome for a in _audit(vw)] == ["refused"] * 3  # a body too large is counted, not audited


# --- alerts, health, metrics, schema --------------------------------------------------------
def test_alerts_are_recorded_firing_then_resolved(vw, api):
    server = api()
    firing = server.call("POST", "/v1/alerts", _alertmanager("firing"))
    assert firing.status == 200 and firing.json()["new"] == 1
    again = server.call("POST", "/v1/alerts", _alertmanager("firing"))  # Alertmanager's repeat_interval
    assert again.status == 200 and again.json()["repeated"] == 1
    [row] = _alerts(vw)
    assert (row.fingerprint, row.name, row.status, row.host, row.action) == (
        "3f2a9c0d1e4b5a67", "HostDiskFailing", "firing", "local", None)
    assert row.resolved_at is None and row.labels["severity"] == "critical"
    # what became of it, for the on-call engineer: GET /v1/alerts and `virtwarden alerts`
    [listed] = server.call("GET", "/v1/alerts").json()
    assert (listed["name"], listed["outcome"], listed["job_id"]) == ("HostDiskFailing", "unmatched", None), listed
    assert listed["detail"] == "no policy's spec.migration.on_alerts matches alert 'HostDiskFailing'"
    assert server.call("GET", "/v1/alerts?host=elsewhere").json() == []
    assert server.call("GET", "/v1/alerts?limit=0").status == 422

    resolved = server.call("POST", "/v1/alerts", _alertmanager("resolved", ends="2026-11-27T03:00:00Z"))
    assert resolved.status == 200 and resolved.json()["resolved"] == 1
    [row] = _alerts(vw)
    assert row.status == "resolved" and row.resolved_at.isoformat() == "2026-11-27T03:00:00+00:00"
    assert row.outcome == "unmatched"  # resolving keeps what the firing did
    r = vw.cli("alerts", "--json")
    assert r.code == 0 and r.json() == server.call("GET", "/v1/alerts").json() != []
    table = vw.cli("alerts").out
    assert "HostDiskFailing" in table and "unmatched" in table and "resolved" in table
    assert [(a.action, a.outcome) for a in _audit(vw)] == [("api.alerts", "succeeded")] * 3


def test_an_alert_that_cannot_act_now_answers_503_so_alertmanager_resends(vw, api, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "drain.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata: {name: drain}\n"
        "spec:\n  migration:\n    host_label: host\n    on_alerts: [{alertname: HostDiskFailing}]\n")
    vw.extra["policy_dir"] = str(policies)
    vw.hosts["spare"] = {"uri": "qemu+tcp://127.0.0.1:1/system"}  # a group of two: draining one is allowed
    vw.extra["broker_url"] = "redis://127.0.0.1:1/0"  # nothing listens there
    server = api()
    r = server.call("POST", "/v1/alerts", _alertmanager("firing"))
    assert r.status == 503, r.body
    reply = r.json()
    assert reply["retry"] is True and reply["alerts"][0]["outcome"] == "error"
    assert "broker" in reply["alerts"][0]["detail"].lower()
    assert _jobs(vw) == []
    [row] = _alerts(vw)  # recorded once: the resend finishes what this one could not
    assert (row.name, row.host, row.action) == ("HostDiskFailing", "local", "evacuate")


def test_healthz_says_which_dependency_is_down(vw, api):
    up = api()
    r = up.call("GET", "/healthz", token=None)
    assert r.status == 200 and r.json() == {"status": "ok", "catalog": "ok", "broker": "ok"}
    vw.extra["broker_url"] = "redis://127.0.0.1:1/0"  # nothing listens there
    down = api()
    r = down.call("GET", "/healthz", token=None)
    assert r.status == 503, r.body
    reply = r.json()
    assert reply["catalog"] == "ok" and "unreachable" in reply["broker"]
    assert reply["error"] == "broker unavailable"


def test_openapi_schema_lists_the_routes(vw, api):
    server = api()
    schema = server.call("GET", "/openapi.json", token=None).json()
    assert {"/v1/restores", "/v1/jobs/{job_id}", "/v1/domains/{name}/restore-points", "/v1/alerts",
            "/healthz", "/metrics"} <= set(schema["paths"])
    assert "202" in schema["paths"]["/v1/restores"]["post"]["responses"]
    assert "RestoreIn" in schema["components"]["schemas"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    page = server.call("GET", "/docs", token=None)  # rendered here: an offline network sees it whole
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    text = page.body.decode()
    assert "<code>/v1/restores</code>" in text and "RestoreIn" in text and "Scope: `read`" in text
    assert "cdn" not in text.lower() and "<script" not in text and "src=" not in text
    assert server.call("GET", "/redoc", token=None).status == 404


def test_metrics_parse_and_count_drills_and_requests(vw, api):
    from datetime import datetime, timedelta

    from virtwarden.catalog.models import Drill, RestorePoint

    server = api()
    server.call("GET", "/v1/jobs/nope")
    server.call("GET", "/v1/jobs/nope", token=None)
    cat = vw.catalog()
    start = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
    with cat.session() as s:  # two drills of web01 (the later one failed), one of db01
        s.add(Drill(id="d1", domain="web01", host="local", state="passed", checks=[], restore_seconds=20.0,
                    boot_seconds=3.5, started_at=start, finished_at=start + timedelta(minutes=1)))
        s.add(Drill(id="d2", domain="web01", host="local", state="failed", checks=[], restore_seconds=21.0,
                    boot_seconds=None, started_at=start + timedelta(days=1)))
        s.add(Drill(id="d3", domain="db01", host="local", state="passed", checks=[], restore_seconds=40.0,
                    boot_seconds=2.0, started_at=start))
        s.add(Drill(id="d4", domain="db01", host="local", state="running", checks=[],
                    started_at=start + timedelta(days=2)))
        for n, (storage, fmt, status, size) in enumerate([("nfs", 1, "complete", 100), ("nfs", 1, "damaged", 7),
                                                          ("nfs", 1, "deleted", 1000), ("nfs", 1, "writing", 9),
                                                          ("vault", 2, "complete", 30), ("vault", 2, "complete", 5)]):
            s.add(RestorePoint(id=f"p{n}", domain="web01", domain_uuid="u", host="local", storage=storage,
                               strategy="bitmap", chain_id=f"c{n}", seq=0, level="full", status=status,
                               manifest_key=f"p{n}/manifest.json", format=fmt, size_bytes=size))
    cat.close()
    r = server.call("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.body.decode())
    assert samples[("virtwarden_catalog_up", ())] == 1
    assert samples[("virtwarden_drill_last_success", (("domain", "web01"),))] == 0
    assert samples[("virtwarden_drill_last_success", (("domain", "db01"),))] == 1
    assert samples[("virtwarden_drill_last_recovery_seconds", (("domain", "db01"),))] == 42.0
    assert samples[("virtwarden_drill_last_timestamp_seconds", (("domain", "web01"),))] == (
        start + timedelta(days=1)).timestamp()
    held = {labels: v for (name, labels), v in samples.items() if name == "virtwarden_storage_points"}
    stored = {labels: v for (name, labels), v in samples.items() if name == "virtwarden_storage_stored_bytes"}
    nfs, vault = (("format", "1"), ("storage", "nfs")), (("format", "2"), ("storage", "vault"))
    assert (held, stored) == ({nfs: 2, vault: 2}, {nfs: 107, vault: 35})  # complete or damaged: held
    requests = {labels: v for (name, labels), v in samples.items() if name == "virtwarden_api_requests_total"}
    assert requests[(("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))] == 1
    assert requests[(("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "401"))] == 1

    assert server.call("GET", "/metrics", token=None).status == 401  # by default /metrics needs a token
    opened = api(metrics_require_token=False)
    assert opened.call("GET", "/metrics", token=None).status == 200


def test_a_domain_that_never_had_a_good_backup_has_an_age_and_a_failure_count(vw, api):
    """The README's alert on the age of the newest point must fire for a domain that has
    none: its age counts from the first slot (or job) that should have made one."""
    from datetime import datetime, timedelta

    from virtwarden.catalog.models import Job, ScheduleSlot

    server = api()
    now = datetime.now(UTC).replace(microsecond=0)
    cat = vw.catalog()
    with cat.session() as s:
        s.add(ScheduleSlot(policy="p", job="backup", domain="fresh01", slot_at=now - timedelta(hours=3),
                           window_end=now - timedelta(hours=2), state="started"))
        s.add(ScheduleSlot(policy="p", job="backup", domain="retired01", slot_at=now - timedelta(days=30),
                           window_end=now - timedelta(days=30), state="started"))
        for n, (domain, state, hours) in enumerate([("fresh01", "failed", 2), ("fresh01", "failed", 1),
                                                    ("db01", "failed", 2), ("db01", "succeeded", 1)]):
            at = now - timedelta(hours=hours)
            s.add(Job(id=f"j{n}", kind="backup", state=state, domain=domain, params={}, created_at=at,
                      finished_at=at + timedelta(minutes=1)))
    cat.close()
    samples = _samples(server.call("GET", "/metrics").body.decode())
    age = samples[("virtwarden_latest_restore_point_age_seconds", (("domain", "fresh01"),))]
    assert 3 * 3600 <= age < 3 * 3600 + 120, age
    assert ("virtwarden_latest_restore_point_timestamp_seconds", (("domain", "fresh01"),)) not in samples
    assert samples[("virtwarden_backup_consecutive_failures", (("domain", "fresh01"),))] == 2
    assert samples[("virtwarden_backup_last_failure_timestamp_seconds", (("domain", "fresh01"),))] == (
        now - timedelta(hours=1) + timedelta(minutes=1)).timestamp()
    assert samples[("virtwarden_backup_consecutive_failures", (("domain", "db01"),))] == 0
    assert samples[("virtwarden_latest_restore_point_age_seconds", (("domain", "db01"),))] >= 2 * 3600
    assert not [k for k in samples if ("domain", "retired01") in k[1]]  # long gone: no series


@pytest.mark.libvirt
def test_a_real_backup_is_in_the_duration_histogram_and_a_job_without_worker_in_its_hosts_queue(
        vw, api, guest_factory):
    """The histogram and the stored bytes come from jobs a real worker ran; the queue
    gauges from a job that waits because the host's worker is gone."""
    from virtwarden import __version__

    g = guest_factory(disks=1, size_mib=16)
    server = api()
    vw.start_worker()
    g.write_random("vda", 0, 2 * MiB)
    done = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert done.code == 0, done.err
    size = done.json()["result"]["size_bytes"]
    vw.close()  # the host's worker stops: the next job waits
    assert vw.cli("backup", g.name, "--target", "nfs").code == 0

    samples = _samples(server.call("GET", "/metrics").body.decode())
    backup_ok = (("kind", "backup"), ("outcome", "succeeded"))
    assert samples[("virtwarden_job_duration_seconds_count", backup_ok)] == 1
    assert 0 < samples[("virtwarden_job_duration_seconds_sum", backup_ok)] < 60
    every = (("kind", "backup"), ("le", "+Inf"), ("outcome", "succeeded"))  # labels sorted, as _samples keys them
    assert samples[("virtwarden_job_duration_seconds_bucket", every)] == 1
    assert samples[("virtwarden_backup_stored_bytes_total", (("outcome", "succeeded"),))] == size > 0
    assert samples[("virtwarden_queued_jobs", (("host", "local"),))] == 1
    assert 0 <= samples[("virtwarden_oldest_queued_job_age_seconds", (("host", "local"),))] < 60
    assert ("virtwarden_running_jobs", (("host", "local"),)) not in samples
    assert ("virtwarden_longest_running_job_seconds", (("host", "local"),)) not in samples
    assert samples[("virtwarden_build_info", (("version", __version__),))] == 1

    # A worker takes the waiting job and does not come back from it (as one waiting on a
    # guest that does not answer): how long its attempt has run.
    from virtwarden.catalog import jobs

    cat = _catalog(vw)
    waiting = [j for j in jobs.recent(cat, limit=5) if j.state == "queued"]
    assert len(waiting) == 1
    assert jobs.claim(cat, waiting[0].id, "a-stuck-worker", 3600, lock_domain=True).ok
    samples = _samples(server.call("GET", "/metrics").body.decode())
    assert samples[("virtwarden_running_jobs", (("host", "local"),))] == 1
    assert 0 <= samples[("virtwarden_longest_running_job_seconds", (("host", "local"),))] < 60


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- a restore started by a webhook, end to end ------------------------------------------------
@pytest.mark.libvirt
def test_restore_by_webhook_followed_to_completion_bit_for_bit(vw, api, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=32)
    vw.extra["restore"] = {"allowed_dirs": [str(tmp_path)]}  # for the API and the worker
    vw.start_worker()
    g.write_random("vda", 0, 3 * MiB)
    backup = vw.cli("backup", g.name, "--target", "nfs", "--wait", "--json")
    assert backup.code == 0, backup.err
    expected = g.shadow_copy("vda", tmp_path / "expected.raw")
    g.write("vda", 0, MiB, pattern=0x77)  # after the point: must not be in the restore
    server = api(hmac=True)
    out = tmp_path / "restored"
    body = {"domain": g.name, "point": "latest", "to_dir": str(out)}
    key = {"Idempotency-Key": secrets.token_hex(16)}

    # Bad credentials start nothing, even for a request that would succeed.
    assert server.call("POST", "/v1/restores", body, token=OTHER[:-2], headers=key, signed=0).status == 401
    forged = {**key, "X-Virtwarden-Signature": sign(b"x" * 32, json.dumps(body).encode(), int(time.time()))}
    assert server.call("POST", "/v1/restores", body, headers=forged).status == 401
    assert [j.kind for j in _jobs(vw)] == ["backup"]

    # The webhook and its retries, some at once: one job.
    data = json.dumps(body).encode()
    replies: list[Reply] = []

    def send(age: int) -> None:
        signature = {"X-Virtwarden-Signature": sign(KEY, data, int(time.time()) - age)}
        replies.append(server.call("POST", "/v1/restores", raw=data, headers={**key, **signature}))

    threads = [threading.Thread(target=send, args=(age,)) for age in (0, 10, 20)]  # distinct signatures
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in replies) == [200, 200, 202], [r.body for r in replies]
    job_id = replies[0].json()["job_id"]
    assert {r.json()["job_id"] for r in replies} == {job_id}
    assert all(r.headers["location"] == f"/v1/jobs/{job_id}" for r in replies)
    later = server.call("POST", "/v1/restores", body, headers=key, signed=30)
    assert (later.status, later.json()["job_id"], later.json()["replayed"]) == (200, job_id, True)
    conflict = server.call("POST", "/v1/restores", {**body, "to_dir": str(tmp_path / "elsewhere")},
                           headers=key, signed=40)
    assert conflict.status == 409 and "different request" in conflict.json()["error"]
    assert sorted(j.kind for j in _jobs(vw)) == ["backup", "restore"]

    job = _follow(server, job_id)
    assert job["state"] == "succeeded", job["error"]
    assert (job["kind"], job["domain"], job["requested_by"]) == ("restore", g.name, "api:alertmanager")
    assert job["result"]["point_id"] == backup.json()["result"]["point_id"]
    assert images_equal(out / "vda.qcow2", expected)

    points = server.call("GET", f"/v1/domains/{g.name}/restore-points").json()
    assert points == vw.cli("backups", g.name, "--json").json()
    started = [a for a in _audit(vw) if a.outcome == "started"]
    assert [(a.actor, a.action, a.target, a.job_id) for a in started] == [
        ("api:alertmanager", "api.restore", g.name, job_id)]
    assert started[0].params["to_dir"] == str(out)

    samples = _samples(server.call("GET", "/metrics").body.decode())
    assert samples[("virtwarden_jobs", (("kind", "restore"), ("state", "succeeded")))] == 1
    assert samples[("virtwarden_jobs", (("kind", "backup"), ("state", "succeeded")))] == 1
    assert samples[("virtwarden_latest_restore_point_age_seconds", (("domain", g.name),))] >= 0


@pytest.mark.libvirt
def test_restore_with_the_broker_down_is_503_and_starts_nothing(vw, api, guest_factory):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    assert vw.cli("backup", g.name, "--target", "nfs", "--wait").code == 0
    vw.extra["broker_url"] = "redis://127.0.0.1:1/0"
    server = api()
    r = server.call("POST", "/v1/restores", {"domain": g.name, "to_dir": str(vw.data_dir / "restores" / "never")})
    assert r.status == 503 and "unreachable" in r.json()["error"]
    assert [j.kind for j in _jobs(vw)] == ["backup"]
    assert [a.outcome for a in _audit(vw)] == ["refused"]


# --- the shipped alerting rules, on a real Prometheus ------------------------------------------
def test_the_shipped_rules_pass_promtool_and_fire_on_a_real_scrape(vw, api, tmp_path):
    """deploy/prometheus/rules.yml passes ``promtool check rules``; then Debian's
    Prometheus scrapes this API with a read token and evaluates the same rules (their
    ``for:`` durations set to 0 s): a domain whose backups keep failing, one that was
    due 27 h ago without ever getting a point, a host whose job has waited 2 h for a
    worker, that worker, silent for 10 minutes, a host whose job has run for 7 h, and a repository whose unused chunks
    have waited 13 h for a gc, all alert. Every query of the shipped
    Grafana dashboard then runs on that Prometheus and shows them."""
    import re
    import shutil
    import urllib.parse
    import urllib.request
    from datetime import datetime, timedelta

    from virtwarden.catalog.models import Job, RepositoryUsage, ScheduleSlot, Service

    from tests.conftest import need

    need(shutil.which("promtool") is not None and shutil.which("prometheus") is not None,
         "prometheus and promtool (scripts/testhost.sh installs Debian's prometheus)")
    rules = REPO / "deploy" / "prometheus" / "rules.yml"
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 11 rules found" in checked.stdout, checked.stdout + checked.stderr

    now = datetime.now(UTC)
    cat = vw.catalog()
    with cat.session() as s:
        s.add(ScheduleSlot(policy="p", job="backup", domain="stale01", slot_at=now - timedelta(hours=27),
                           window_end=now - timedelta(hours=26), state="skipped"))
        for n in range(2):
            at = now - timedelta(minutes=30 - n)
            s.add(Job(id=f"f{n}", kind="backup", state="failed", domain="failing01", params={}, created_at=at,
                      finished_at=at))
        s.add(Job(id="q1", kind="backup", state="queued", domain="waiting01", host="kvm09", params={},
                  created_at=now - timedelta(hours=2)))  # kvm09's worker is gone
        s.add(Job(id="r1", kind="backup", state="running", domain="stuck01", host="kvm10", params={},
                  created_at=now - timedelta(hours=7), started_at=now - timedelta(hours=7)))  # waits on its guest
        s.add(Service(id="worker:kvm09:kvm09", kind="worker", node="kvm09", hosts="kvm09", pid=4242, version="0.1.0",
                      started_at=now - timedelta(days=1), seen_at=now - timedelta(minutes=10)))  # ... since 10 min
        s.add(RepositoryUsage(storage="vault", garbage_since=now - timedelta(hours=13), garbage_last=now,
                              deleted_chunks=0, deleted_bytes=0))
    cat.close()
    server = api()
    (tmp_path / "rules.yml").write_text(re.sub(r"for: \d+m", "for: 0s", rules.read_text()))
    token = tmp_path / "prometheus-token"
    token.write_text(TOKEN)
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{tmp_path / 'rules.yml'}]\n"
        "scrape_configs:\n  - job_name: virtwarden\n"
        f"    authorization: {{type: Bearer, credentials_file: {token}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n")
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def firing() -> set[tuple[str, str]] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=2) as r:
                    alerts = json.load(r)["data"]["alerts"]
            except OSError:
                return None
            found = {(a["labels"]["alertname"], a["labels"].get("domain") or a["labels"].get("host")
                      or a["labels"].get("storage") or a["labels"].get("node", "")) for a in alerts
                     if a["state"] == "firing"}
            wanted = {("VirtwardenBackupFailing", "failing01"), ("VirtwardenBackupTooOld", "stale01"),
                      ("VirtwardenJobsWaiting", "kvm09"), ("VirtwardenServiceSilent", "kvm09"),
                      ("VirtwardenJobRunningLong", "kvm10"),
                      ("VirtwardenRepositoryGarbageWaiting", "vault")}
            return found if wanted <= found else None

        found = wait_for(firing, 60, lambda: f"the rules to fire:\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        assert ("VirtwardenBackupTooOld", "failing01") not in found  # its first job is 30 minutes old
        assert not [a for a in found if a[0] == "VirtwardenApiDown"]

        # the shipped Grafana dashboard: well formed, and every query runs on these series
        dashboard = json.loads((REPO / "deploy" / "prometheus" / "grafana-dashboard.json").read_text())
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels) and all(p["targets"] for p in panels)
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
        values = {}
        for panel in panels:
            for target in panel["targets"]:
                url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": target["expr"]})
                with urllib.request.urlopen(url, timeout=5) as r:
                    answer = json.load(r)
                assert answer["status"] == "success", (panel["title"], answer)
                values[panel["title"]] = answer["data"]["result"]
        stale = values["Domains whose newest point is older than 26 h"]
        assert float(stale[0]["value"][1]) >= 1, stale  # stale01
        failing = values["Backups failed in a row, per domain"]
        assert {r["metric"]["domain"] for r in failing} == {"failing01"}, failing
        waiting = values["Jobs waiting for a worker, per host"]
        assert [(r["metric"]["host"], r["value"][1]) for r in waiting] == [("kvm09", "1")], waiting
        running = values["Longest-running job, per host"]
        assert [r["metric"]["host"] for r in running] == ["kvm10"] and float(running[0]["value"][1]) > 6 * 3600
        garbage = values["Unused chunks waiting for gc, per target"]
        assert [r["metric"]["storage"] for r in garbage] == ["vault"] and float(garbage[0]["value"][1]) > 12 * 3600
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()


# --- the shipped Alertmanager receiver, on a real Alertmanager ----------------------------------
def test_the_shipped_alertmanager_receiver_delivers_host_alerts_with_an_alerts_only_token(vw, api, tmp_path):
    """deploy/prometheus/alertmanager.yml passes ``amtool check-config``; Debian's
    Alertmanager, run with it (the URL, token file and group wait changed only), delivers a
    host alert its route matches to POST /v1/alerts with a token of the ``alerts`` scope,
    which can do nothing else; an alert the route does not name never arrives."""
    import shutil
    import urllib.request
    from datetime import datetime

    from tests.conftest import need

    need(shutil.which("prometheus-alertmanager") is not None and shutil.which("amtool") is not None,
         "prometheus-alertmanager and amtool (scripts/testhost.sh installs Debian's prometheus-alertmanager)")
    shipped = REPO / "deploy" / "prometheus" / "alertmanager.yml"
    checked = subprocess.run(["amtool", "check-config", str(shipped)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr

    alerts_only = "am-" + secrets.token_hex(16)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alertmanager:alerts:{alerts_only}\noncall:{TOKEN}\n")
    tokens.chmod(0o600)
    server = api(token_file=str(tokens))
    (tmp_path / "am-token").write_text(alerts_only)
    text = shipped.read_text()
    for old, new in [("https://virtwarden-api.example:8443/v1/alerts", f"http://127.0.0.1:{server.port}/v1/alerts"),
                     ("/etc/alertmanager/virtwarden-token", str(tmp_path / "am-token")),
                     ("group_wait: 10s", "group_wait: 0s")]:
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "alertmanager.yml").write_text(text)
    port = _free_port()
    log = open(tmp_path / "alertmanager.log", "wb")  # noqa: SIM115 - closed below
    manager = subprocess.Popen(
        ["prometheus-alertmanager", f"--config.file={tmp_path / 'alertmanager.yml'}",
         f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address=", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        now = datetime.now(UTC).isoformat()
        sent = json.dumps([{"labels": {"alertname": name, "instance": "local:9100", "severity": "critical"},
                            "annotations": {"summary": "a test"}, "startsAt": now}
                           for name in ("HostDiskFailing", "SomethingElse")]).encode()

        def posted() -> bool:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/alerts", data=sent,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(posted, 30, lambda: f"Alertmanager to take alerts:\n{(tmp_path / 'alertmanager.log').read_text()}")
        def handled() -> list | None:
            """Every alert listed, once each has its outcome (an alert is listed from the
            moment it is recorded, its outcome once it was handled)."""
            listed = server.call("GET", "/v1/alerts").json()
            return listed if listed and all(a["outcome"] for a in listed) else None

        received = wait_for(handled, 60,
                            lambda: f"the alert to arrive:\n{(tmp_path / 'alertmanager.log').read_text()[-2000:]}")
        assert [(a["name"], a["host"], a["outcome"]) for a in received] == [
            ("HostDiskFailing", "local", "unmatched")], received
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/alerts", timeout=5) as r:
            routed = {a["labels"]["alertname"]: sorted(x["name"] for x in a["receivers"]) for a in json.load(r)}
        assert routed == {"HostDiskFailing": ["default", "virtwarden"], "SomethingElse": ["default"]}, routed
    finally:
        manager.terminate()
        manager.wait(30)
        log.close()
    # the token Alertmanager holds posts alerts and can do nothing else
    assert server.call("GET", "/v1/alerts", token=alerts_only).status == 403
    assert server.call("POST", "/v1/restores", {"domain": "x", "to_dir": "/tmp/x"}, token=alerts_only).status == 403
