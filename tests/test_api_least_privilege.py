"""The API's least privilege and limits, through a real ``virtwarden api`` process and
its real catalog: scoped tokens, refusals that cost no catalog rows, body and payload
caps, per-token rate limits and /metrics behind a token."""
from __future__ import annotations

import http.client
import json
import logging
import secrets
import time

import pytest

from tests.test_api import (  # noqa: F401 - api is a fixture
    TOKEN,
    ApiServer,
    _alertmanager,
    _alerts,
    _audit,
    _follow,
    _jobs,
    _samples,
    api,
)
from virtwarden.api.scopes import SCOPES

MiB = 1024 * 1024
ONLY = {scope: f"{scope}-{secrets.token_hex(16)}" for scope in SCOPES}  # a token holding one scope each
ALERT_BODY = _alertmanager("firing")
TO_DIR = {"domain": "web01", "to_dir": "/srv/restore/web01"}
AS_DOMAIN = {"domain": "web01", "as_domain": "web01-copy", "start": True}
IN_PLACE = {"domain": "web01", "in_place": True, "discard_old": True, "start": True}
# (method, path, body, the one scope besides admin that allows it, endpoint as the 403 names it)
ENDPOINTS = [
    ("POST", "/v1/restores", TO_DIR, "restore", "POST /v1/restores"),
    ("POST", "/v1/restores", AS_DOMAIN, "restore-domain", "POST /v1/restores"),
    ("POST", "/v1/restores", IN_PLACE, "restore-in-place", "POST /v1/restores"),
    ("POST", "/v1/alerts", ALERT_BODY, "alerts", "POST /v1/alerts"),
    ("GET", "/v1/jobs/some-job", None, "read", "GET /v1/jobs/{job_id}"),
    ("GET", "/v1/domains/web01/restore-points", None, "read", "GET /v1/domains/{name}/restore-points"),
    ("GET", "/metrics", None, "read", "GET /metrics"),
    ("GET", "/v1/overview", None, "read", "GET /v1/overview"),
    ("GET", "/v1/jobs", None, "read", "GET /v1/jobs"),
    ("GET", "/v1/drills", None, "read", "GET /v1/drills"),
    ("POST", "/v1/drills", {"domain": "web01"}, "drill", "POST /v1/drills"),
    ("POST", "/v1/drills?dry_run=true", {"domain": "web01"}, "drill", "POST /v1/drills"),
    ("POST", "/v1/restores?dry_run=true", TO_DIR, "restore", "POST /v1/restores"),
    ("GET", "/v1/runbooks", None, "read", "GET /v1/runbooks"),
    ("POST", "/v1/runbooks/verify-repository/runs?dry_run=true", {"params": {}}, "runbook",
     "POST /v1/runbooks/{name}/runs"),
]


def _scoped_tokens(api, extra: str = "") -> None:
    api.tokens.write_text("".join(f"only-{scope}:{scope}:{token}\n" for scope, token in ONLY.items()) + extra)


def _refused(server: ApiServer, token: str = ONLY["read"]) -> dict[str, float]:
    samples = _samples(server.call("GET", "/metrics", token=token).body.decode())
    return {dict(labels)["reason"]: v for (name, labels), v in samples.items()
            if name == "virtwarden_api_refused_requests_total"}


# --- scopes ----------------------------------------------------------------------------------
def test_every_endpoint_refuses_a_token_without_its_scope_with_403_and_starts_nothing(vw, api):
    _scoped_tokens(api)
    vw.extra["restore"] = {"allowed_dirs": ["/srv/restore"]}  # TO_DIR's
    server = api()
    refusals = 0
    for method, path, body, needed, endpoint in ENDPOINTS:
        for scope, token in ONLY.items():
            if scope in (needed, "admin"):
                continue
            r = server.call(method, path, body, token=token)
            assert r.status == 403, (method, path, scope, r.body)
            reply = r.json()
            assert (reply["missing_scope"], reply["endpoint"]) == (needed, endpoint), reply
            assert f"token 'only-{scope}'" in reply["error"] and f"scope '{needed}'" in reply["error"]
            refusals += 1
    assert _jobs(vw) == [] and _alerts(vw) == []
    audit = _audit(vw)
    assert len(audit) == refusals and {a.outcome for a in audit} == {"refused"}
    assert {a.actor for a in audit} == {f"api:only-{s}" for s in SCOPES if s != "admin"}
    assert all("scope '" in a.detail for a in audit)
    assert not any(t in json.dumps(a.params) + (a.detail or "") for a in audit for t in ONLY.values())

    # The scope that is named lets the request through to the next check (here: there is
    # no such domain, job or point), and so does admin.
    for method, path, body, needed, _ in ENDPOINTS:
        for token in (ONLY[needed], ONLY["admin"]):
            assert server.call(method, path, body, token=token).status in (200, 404), (path, needed)


def test_a_runbook_step_needs_its_own_scope_besides_runbook(vw, api):
    """A runbook whose step drills (or restores in place) is refused to a token that may
    run runbooks but not drill: a runbook is no way around a scope. Nothing starts."""
    _scoped_tokens(api, f"ops:runbook,drill:{TOKEN}\n")
    server = api()
    body = {"params": {"domain": "web01"}}
    r = server.call("POST", "/v1/runbooks/drill-now/runs?dry_run=true", body, token=ONLY["runbook"])
    assert r.status == 403 and r.json()["missing_scope"] == "drill", r.body
    assert "step 1 of runbook drill-now" in r.json()["error"]
    in_place = {"params": {"domain": "web01", "in_place": "true"}}
    r = server.call("POST", "/v1/runbooks/restore-latest/runs", in_place, token=TOKEN)
    assert r.status == 403 and r.json()["missing_scope"] == "restore-in-place", r.body
    r = server.call("POST", "/v1/runbooks/no-such-book/runs", body, token=TOKEN)
    assert r.status == 404 and "no runbook named 'no-such-book'" in r.json()["error"]
    r = server.call("POST", "/v1/runbooks/drill-now/runs", {"params": {"color": "red"}}, token=TOKEN)
    assert r.status == 422 and "unknown parameter 'color'" in r.json()["error"], r.body
    assert _jobs(vw) == []


def test_an_alerts_only_token_posts_alerts_but_cannot_restore_or_read(vw, api):
    _scoped_tokens(api)
    server = api()
    alertmanager = ONLY["alerts"]
    assert server.call("POST", "/v1/alerts", ALERT_BODY, token=alertmanager).status == 200
    assert server.call("POST", "/v1/restores", TO_DIR, token=alertmanager).status == 403
    assert server.call("POST", "/v1/restores", IN_PLACE, token=alertmanager).status == 403
    assert server.call("GET", "/v1/domains/web01/restore-points", token=alertmanager).status == 403
    assert server.call("GET", "/metrics", token=alertmanager).status == 403
    assert [a.name for a in _alerts(vw)] == ["HostDiskFailing"] and _jobs(vw) == []
    assert [(a.actor, a.action, a.outcome) for a in _audit(vw)] == [
        ("api:only-alerts", "api.alerts", "succeeded"), ("api:only-alerts", "api.restore", "refused"),
        ("api:only-alerts", "api.restore", "refused"), ("api:only-alerts", "api.get", "refused"),
        ("api:only-alerts", "api.get", "refused")]


def test_a_token_line_without_scopes_keeps_every_scope_and_the_environment_token_has_them_all(vw, api, tmp_path):
    # The fixture's file is in the old format: NAME:TOKEN and a bare TOKEN.
    server = api()
    assert server.call("POST", "/v1/restores", IN_PLACE).status == 404  # past every scope check
    assert "names no scopes, so it may do everything" in server.log.read_text()
    env_token = "env-" + secrets.token_hex(16)
    vw.extra["api"] = {"max_alerts_per_payload": 5}
    alone = ApiServer(vw.write_config(), tmp_path / "env-api.log", {"VIRTWARDEN_API_TOKEN": env_token})
    try:
        alone.wait_ready()
        assert alone.call("POST", "/v1/restores", IN_PLACE, token=env_token).status == 404
        assert alone.call("GET", "/metrics", token=env_token).status == 200
    finally:
        alone.stop()


@pytest.mark.libvirt
def test_a_restore_that_would_run_starts_only_for_a_token_with_its_scope(vw, api, guest_factory):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    assert vw.cli("backup", g.name, "--target", "nfs", "--wait").code == 0
    _scoped_tokens(api, f"restorer:read,restore:{TOKEN}\n")
    server = api()
    out = vw.data_dir / "restores" / g.name  # where API restores may write by default
    bodies = {"restore": {"domain": g.name, "to_dir": str(out)},
              "restore-domain": {"domain": g.name, "as_domain": f"{g.name}-copy", "start": True},
              "restore-in-place": {"domain": g.name, "in_place": True, "discard_old": True, "start": True}}
    planned = server.call("POST", "/v1/restores?dry_run=true", bodies["restore"], token=TOKEN)
    assert planned.status == 200 and planned.json()["plan"]["to_dir"] == str(out), planned.body
    assert planned.json()["kind"] == "restore" and [j.kind for j in _jobs(vw)] == ["backup"], "a plan starts nothing"
    assert [(a.actor, a.action, a.outcome) for a in _audit(vw)] == [("api:restorer", "api.restore", "dry-run")]
    for needed, body in bodies.items():
        for scope, token in ONLY.items():
            if scope not in (needed, "admin"):
                assert server.call("POST", "/v1/restores", body, token=token).status == 403, (needed, scope)
        expected = 202 if needed == "restore" else 403  # restorer holds read and restore only
        assert server.call("POST", "/v1/restores", body, token=TOKEN).status == expected, needed
    [job] = [j for j in _jobs(vw) if j.kind != "backup"]
    assert (job.kind, job.requested_by, job.params["to_dir"]) == ("restore", "api:restorer", str(out))
    assert _follow(server, job.id)["state"] == "succeeded"  # restorer may read its job
    assert (out / "vda.qcow2").exists()
    started = [a for a in _audit(vw) if a.outcome == "started"]
    assert [(a.actor, a.job_id) for a in started] == [("api:restorer", job.id)]


# --- refusals without credentials -------------------------------------------------------------
def test_a_thousand_bad_token_requests_leave_the_audit_log_unchanged_and_are_counted(vw, api):
    _scoped_tokens(api)
    server = api()
    assert server.call("POST", "/v1/alerts", ALERT_BODY, token=ONLY["alerts"]).status == 200
    before = [(a.id, a.outcome) for a in _audit(vw)]
    wrong = "x" * 32
    kinds = [("POST", "/v1/alerts", ALERT_BODY, wrong, {}), ("POST", "/v1/restores", TO_DIR, wrong, {}),
             ("GET", "/v1/jobs/x", None, None, {}), ("GET", "/metrics", None, None, {"Authorization": "Basic eA=="})]
    for i in range(1000):
        method, path, body, token, headers = kinds[i % 4]
        assert server.call(method, path, body, token=token, headers=headers).status == 401
    assert [(a.id, a.outcome) for a in _audit(vw)] == before
    assert _refused(server) == {"bad-token": 500, "no-token": 250, "not-bearer": 250}
    logged = [line for line in server.log.read_text().splitlines() if "refused " in line]
    assert 1 <= len(logged) <= 6, logged  # at most one a minute per reason


# --- caps -------------------------------------------------------------------------------------
def test_a_body_over_the_cap_gets_413_before_it_is_read_or_parsed(vw, api):
    _scoped_tokens(api)
    server = api(max_body_bytes=4096)
    not_json = b"{" + b" " * 4096  # parsed, it would be a 422
    r = server.call("POST", "/v1/alerts", raw=not_json, token=ONLY["alerts"])
    assert r.status == 413 and r.json()["error"] == (
        "request body larger than 4096 bytes (api.max_body_bytes): not read")
    # Without a Content-Length (chunked), the cap applies while reading.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/restores", body=iter([b"{" + b" " * 3000, b" " * 3000]), encode_chunked=True,
                 headers={"Authorization": f"Bearer {ONLY['restore']}", "Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 413 and "4096 bytes" in json.loads(reply.read())["error"]
    conn.close()
    assert server.call("POST", "/v1/alerts", raw=b"{" + b" " * 4000, token=ONLY["alerts"]).status == 422
    assert _refused(server)["body-too-large"] == 2
    assert [a.outcome for a in _audit(vw)] == ["refused"]  # the 422 only


def test_an_alertmanager_payload_over_the_alert_cap_gets_413_and_records_no_alert(vw, api):
    _scoped_tokens(api)
    server = api(max_alerts_per_payload=3)
    payload = _alertmanager("firing")
    payload["alerts"] = [{**payload["alerts"][0], "fingerprint": f"f{i}"} for i in range(4)]
    r = server.call("POST", "/v1/alerts", payload, token=ONLY["alerts"])
    assert r.status == 413, r.body
    assert "4 alerts in one payload; at most 3" in r.json()["error"] and "max_alerts" in r.json()["error"]
    assert _alerts(vw) == [] and _jobs(vw) == []
    assert [(a.outcome, a.actor) for a in _audit(vw)] == [("refused", "api:only-alerts")]
    payload["alerts"] = payload["alerts"][:3]
    assert server.call("POST", "/v1/alerts", payload, token=ONLY["alerts"]).status == 200
    assert sorted(a.fingerprint for a in _alerts(vw)) == ["f0", "f1", "f2"]


# --- rate limits ------------------------------------------------------------------------------
def test_a_flood_from_one_token_gets_429_with_retry_after_and_other_tokens_are_unaffected(vw, api):
    flood, calm = "flood-" + secrets.token_hex(16), "calm-" + secrets.token_hex(16)
    api.tokens.write_text(f"flood:read:{flood} rate=0.5 burst=5\ncalm:read:{calm}\n")
    server = api(rate_per_second=100, rate_burst=100)
    replies = [server.call("GET", "/v1/jobs/x", token=flood) for _ in range(12)]
    assert [r.status for r in replies] == [404] * 5 + [429] * 7
    limited = replies[-1]
    assert int(limited.headers["retry-after"]) in (1, 2)
    assert "per API process" in limited.json()["error"] and "'flood'" in limited.json()["error"]
    assert all(server.call("GET", "/v1/jobs/x", token=calm).status == 404 for _ in range(20))
    assert _refused(server, calm) == {"rate-limited": 7}
    assert _audit(vw) == []
    time.sleep(int(limited.headers["retry-after"]))
    assert server.call("GET", "/v1/jobs/x", token=flood).status == 404


# --- /metrics ---------------------------------------------------------------------------------
def test_metrics_need_a_read_token_unless_opened_in_the_configuration(vw, api):
    _scoped_tokens(api)
    guarded = api()
    r = guarded.call("GET", "/metrics", token=None)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert guarded.call("GET", "/metrics", token=ONLY["alerts"]).status == 403
    assert guarded.call("GET", "/metrics", token=ONLY["read"]).status == 200
    opened = api(metrics_require_token=False)
    assert opened.call("GET", "/metrics", token=None).status == 200
    assert opened.call("GET", "/healthz", token=None).status == 200


# --- the token file and the limiter, without a server ----------------------------------------
def test_token_file_lines_name_scopes_and_limits(caplog):
    from virtwarden.api.auth import parse_tokens
    from virtwarden.errors import ConfigError

    text = (f"am:alerts:{TOKEN} rate=2 burst=40\nops: read , restore-in-place :{TOKEN}x\n"
            f"old:{TOKEN}y\n{TOKEN}z\n")
    lines = parse_tokens(text, "f")
    assert [(t.caller.name, sorted(t.caller.scopes), t.caller.rate, t.caller.burst, t.caller.scoped, t.token)
            for t in lines] == [
        ("am", ["alerts"], 2.0, 40, True, TOKEN), ("ops", ["read", "restore-in-place"], None, None, True, f"{TOKEN}x"),
        ("old", ["admin"], None, None, False, f"{TOKEN}y"), ("token-4", ["admin"], None, None, False, f"{TOKEN}z")]
    for bad, message in [(f"am:alert:{TOKEN}", "f:1: unknown scope 'alert' (did you mean 'alerts'?)"),
                         (f"am::{TOKEN}", "f:1: empty scope list"),
                         (f"am:read:{TOKEN} rate=fast", "f:1: rate must be a number"),
                         (f"am:read:{TOKEN} burst=0", "f:1: rate must be above 0 and burst at least 1"),
                         (f"am:read:{TOKEN} speed=1", "f:1: 'speed=1' is not rate="),
                         ("am:read:short", "f:1: token shorter than 16")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            parse_tokens(bad, "f")


def test_a_token_bucket_passes_its_burst_then_one_request_per_interval():
    from virtwarden.api.limits import LogThrottle, RateLimiter

    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.retry_after("a", 0.5, 3) for _ in range(4)] == [0, 0, 0, 2]
    assert limiter.retry_after("b", 0.5, 3) == 0  # its own bucket
    now[0] += 2.0
    assert (limiter.retry_after("a", 0.5, 3), limiter.retry_after("a", 0.5, 3)) == (0, 2)

    logger = logging.getLogger("test.throttle")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    throttle = LogThrottle(logger, period=60, clock=lambda: now[0])
    for _ in range(5):
        throttle.warning("bad-token", "refused %s", "x")
    now[0] += 61
    throttle.warning("bad-token", "refused %s", "y")
    assert records == ["refused x", "refused y (and 4 more like it since the last one logged)"]
