"""The on-call dashboard (/ui) in a real headless browser: Debian's chromium driven by
Playwright, against a real API server, a real worker and a real guest. The engineer
signs in, sees the fleet and a failed job, is refused an action the token's scopes do
not allow, then starts a drill (its dry-run plan shown first) and follows it to success,
then restores one of the domain's points into a directory and runs a runbook the same
way.
Nothing the page loads comes from anywhere but the API server."""
from __future__ import annotations

import secrets
import shutil
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from tests.conftest import need, need_module
from tests.guests import images_equal
from tests.test_api import api  # noqa: F401 - the fixture

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MARKER = "VW-UI-DRILL-BOOTED"
ONCALL = "oncall-" + secrets.token_hex(16)
VIEWER = "viewer-" + secrets.token_hex(16)


def test_the_on_call_engineer_sees_a_failed_job_and_follows_a_drill_to_success(
        vw, api, guest_factory, tmp_path):
    from virtwarden.catalog.models import Job

    chromium = shutil.which("chromium")
    need(chromium is not None, "Debian's chromium (scripts/testhost.sh installs it)")
    sync_api = need_module("playwright.sync_api")

    g = guest_factory(disks=1, size_mib=32, boot_marker=MARKER.encode())
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(yaml.safe_dump({
        "apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "nightly"},
        "spec": {"selector": {"domains": [g.name]},
                 "backup": {"target": "nfs", "schedule": "0 2 * * *"},
                 "drill": {"run_for": "1s", "serial_marker": MARKER}}}))
    vw.extra["policy_dir"] = str(pdir)
    vw.start_worker()
    r = vw.cli("backup", g.name, "--wait", "--json")
    assert r.code == 0, r.err
    point = r.json()["result"]["point_id"]
    failed_id = str(uuid.uuid4())
    cat = vw.catalog()
    with cat.session() as s:  # last night's backup of another domain, which failed
        at = datetime.now(UTC) - timedelta(hours=3)
        s.add(Job(id=failed_id, kind="backup", state="failed", domain="web09", host="local", params={},
                  created_at=at, finished_at=at, error="libvirt backup job of 'web09' failed: No space left on device"))
    api.tokens.write_text(f"oncall:read,drill,restore,runbook:{ONCALL}\nviewer:read:{VIEWER}\n")
    out = vw.data_dir / "restores" / g.name  # where API restores may write by default
    server = api()

    seen: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda req: seen.append(req.url))
        page.set_default_timeout(15_000)
        expect = sync_api.expect
        reply = page.goto(f"{server.url}/ui")
        assert reply is not None and "script-src 'self'" in reply.headers["content-security-policy"]

        page.fill("#token", "not-a-token")
        page.click("#sign-in")
        expect(page.locator("#login-error")).to_have_text("That token was refused.")

        # A read-only token: the fleet, its policy and schedule, its good point; no drill.
        page.fill("#token", VIEWER)
        page.click("#sign-in")
        row = page.locator(f"#fleet-rows tr[data-domain='{g.name}']")
        expect(row).to_contain_text("nightly")
        expect(row).to_contain_text("s ago")  # its newest good point
        expect(row).to_contain_text("02:00:00")  # the next slot
        expect(page.locator("#fleet-rows tr[data-domain='web09']")).to_contain_text("failed")
        row.locator("button[data-action='drill']").click()
        expect(page.locator("#error")).to_contain_text("Not allowed with this token")
        expect(page.locator("#error")).to_contain_text("scope 'drill'")
        assert not [j for j in vw.cli("jobs", "--json").json() if j["kind"] == "drill"], "nothing started"

        page.click("#tabs button[data-tab='jobs']")
        failed = page.locator(f"#job-rows tr[data-job='{failed_id}']")
        expect(failed).to_have_attribute("data-state", "failed")
        expect(failed).to_contain_text("No space left on device")

        # The on-call token may drill: the plan first, then the drill, followed live.
        page.click("#logout")
        page.fill("#token", ONCALL)
        page.click("#sign-in")
        page.locator(f"#fleet-rows tr[data-domain='{g.name}'] button[data-action='drill']").click()
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-plan")).to_contain_text(point)
        expect(page.locator("#confirm-plan")).to_contain_text(MARKER)
        page.click("#confirm-go")
        banner = page.locator("#following")
        expect(banner).to_contain_text(f"drill of {g.name}")
        expect(banner).to_have_attribute("data-state", "succeeded", timeout=120_000)
        drill_id = page.locator("#job-rows tr.followed").get_attribute("data-job")
        page.click("#tabs button[data-tab='drills']")
        expect(page.locator(f"#drill-rows tr[data-job='{drill_id}']")).to_contain_text("passed")
        page.click("#tabs button[data-tab='fleet']")
        expect(page.locator(f"#fleet-rows tr[data-domain='{g.name}']")).to_contain_text("passed")

        # The domain's points, and one restored into a directory (its plan first).
        page.click(f"#fleet-rows tr[data-domain='{g.name}'] a[data-action='points']")
        point_row = page.locator(f"#point-rows tr[data-point='{point}']")
        expect(point_row).to_contain_text("complete")
        point_row.locator("button[data-action='restore']").click()
        page.fill("#restore-dir", str(out))
        page.click("#ask-dir-go")
        expect(page.locator("#confirm-plan")).to_contain_text(str(out))
        expect(page.locator("#confirm-plan")).to_contain_text(point)
        page.click("#confirm-go")
        expect(banner).to_contain_text(f"restore of {g.name}")
        expect(banner).to_have_attribute("data-state", "succeeded", timeout=120_000)

        # A runbook: its form, every step's plan, then the run followed to its end.
        page.click("#tabs button[data-tab='runbooks']")
        book = page.locator("form[data-runbook='verify-repository']")
        book.locator("input[name='domain']").fill(g.name)
        book.locator("button[data-action='run']").click()
        expect(page.locator("#confirm-plan")).to_contain_text('"action": "verify"')
        page.click("#confirm-go")
        expect(banner).to_contain_text(f"runbook verify-repository of {g.name}")
        expect(banner).to_have_attribute("data-state", "succeeded", timeout=120_000)
        browser.close()

    assert seen and all(url.startswith(server.url) for url in seen), [u for u in seen if not u.startswith(server.url)]
    started = [(j["kind"], j["state"], j["requested_by"]) for j in vw.cli("jobs", "--json").json()
               if j["kind"] != "backup"]
    assert started == [("verify", "succeeded", "api:oncall"), ("runbook", "succeeded", "api:oncall"),
                       ("restore", "succeeded", "api:oncall"), ("drill", "succeeded", "api:oncall")], started
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "vda.raw"))
