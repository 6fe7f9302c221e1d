"""Runbooks: the schema's errors (file:line: field: message), parameters, and runs on a
real worker: each step a job, a failed step failing the run, an audit record for every
run and dry run, and dry runs that change nothing."""
from __future__ import annotations

import textwrap
from datetime import UTC
from pathlib import Path

import pytest
from virtwarden.policies.loader import load_runbooks, validate_paths
from virtwarden.policies.runbooks import BUILTINS, render

from tests.test_api import api  # noqa: F401 - the fixture
from virtwarden.errors import PolicyError

MiB = 1024 * 1024

HEADER = "apiVersion: virtwarden/v1\nkind: Runbook\nmetadata: {name: NAME}\n"

ERRORS = [
    ("spec:\n  steps:\n    - action: restor\n      with: {domain: x}\n",
     "book.yaml:6: spec.steps[0].action: 'restor' is not one of 'backup', 'snapshot', 'restore', 'drill',"
     " 'evacuate', 'verify' (did you mean 'restore'?)"),
    ("spec:\n  steps:\n    - action: drill\n      with: {domian: x}\n",
     "drill takes no 'domian' (did you mean 'domain'?)"),
    ("spec:\n  steps:\n    - action: drill\n      with: {point: latest}\n", "drill needs domain"),
    ("spec:\n  params: {domain: {required: true}}\n  steps:\n    - action: drill\n      with: {domain: '{domian}'}\n",
     "{domian} is not a parameter (did you mean 'domain'?)"),
    ("spec:\n  steps:\n    - action: restore\n      with: {domain: x, to_dir: /a, as_domain: b}\n",
     "restore takes one of to_dir, as_domain, in_place, not to_dir and as_domain"),
    ("spec:\n  steps: []\n", "book.yaml:4: spec: a runbook needs at least one step"),
    ("spec:\n  params: {Bad-Name: {}}\n  steps:\n    - action: verify\n", "spec.params"),
]


@pytest.mark.parametrize(("body", "message"), ERRORS)
def test_runbook_errors_name_the_file_line_and_field(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "book.yaml"
    f.write_text(HEADER.replace("NAME", "book") + body)
    _, errors = validate_paths([str(f)])
    assert errors and any(message in e for e in errors), errors
    assert all(e.startswith(f"{f}:") for e in errors), errors


def test_a_runbook_may_not_take_a_built_in_name(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEADER.replace("NAME", "drill-now") + "spec:\n  steps:\n    - action: verify\n")
    with pytest.raises(PolicyError, match="duplicate runbook name 'drill-now' \\(a built-in runbook\\)"):
        load_runbooks(tmp_path)


def test_runbooks_and_policies_share_a_directory(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(textwrap.dedent("""\
        apiVersion: virtwarden/v1
        kind: Policy
        metadata: {name: p}
        spec: {backup: {target: local}}
        ---
        apiVersion: virtwarden/v1
        kind: Runbook
        metadata: {name: check-all}
        spec:
          steps: [{action: verify}]
        """))
    from virtwarden.policies.loader import load_dir

    assert [p.name for p in load_dir(tmp_path)] == ["p"]
    assert [b.name for b in load_runbooks(tmp_path)][-1] == "check-all"
    assert len(load_runbooks(tmp_path)) == len(BUILTINS) + 1


def test_parameters_are_checked_before_anything_runs() -> None:
    restore_at = next(b for b in BUILTINS if b.name == "restore-at")
    with pytest.raises(PolicyError) as e:
        render(restore_at, {"domian": "web"})
    assert "unknown parameter 'domian' (did you mean 'domain'?)" in str(e.value)
    assert "parameter 'domain' is required" in str(e.value) and "parameter 'at' is required" in str(e.value)
    with pytest.raises(PolicyError, match="needs exactly one of to_dir, as_domain, in_place; got none"):
        render(restore_at, {"domain": "web", "at": "2026-01-01T00:00Z"})
    with pytest.raises(PolicyError, match="in_place must be true or false, not 'maybe'"):
        render(restore_at, {"domain": "web", "at": "2026-01-01T00:00Z", "in_place": "maybe"})
    steps = render(restore_at, {"domain": "web", "at": "2026-01-01T00:00Z", "as_domain": "web-copy"})
    assert [(s.action, s.args) for s in steps] == [
        ("restore", {"domain": "web", "as_domain": "web-copy", "in_place": False, "start": False,
                     "at": "2026-01-01T00:00Z"})]


def _audit(vw) -> list:
    from virtwarden.catalog import audit

    return audit.recent(vw.catalog(), action_prefix="runbook:")


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_verify_repository_passes_then_finds_a_corrupted_artifact(vw, guest_factory, tmp_path):
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x5A)
    assert vw.cli("backup", g.name, "--wait").code == 0
    g.write("vda", 2 * MiB, MiB, pattern=0x6B)
    assert vw.cli("backup", g.name, "--wait").code == 0

    dry = vw.cli("runbook", "run", "verify-repository", "-p", f"domain={g.name}", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    plan = dry.json()["steps"][0]["plan"]
    assert (plan["points"], plan["artifacts"]) == (2, 2) and plan["bytes_to_read"] > MiB
    assert vw.cli("jobs", "--json").json() and all(j["kind"] == "backup" for j in vw.cli("jobs", "--json").json())

    ok = vw.cli("runbook", "run", "verify-repository", "-p", f"domain={g.name}", "--json")
    assert ok.code == 0, ok.err
    report = ok.json()
    assert report["state"] == "succeeded" and report["steps"][0]["result"]["problems"] == []

    from virtwarden.catalog import points

    newest = points.for_domain(vw.catalog(), g.name)[-1]
    stored = Path(vw.storage["nfs"]["path"]) / newest.artifacts[0].key
    with open(stored, "r+b") as f:  # one flipped byte in the newest point's image
        f.seek(stored.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = vw.cli("runbook", "run", "verify-repository", "-p", f"domain={g.name}", "--json")
    assert bad.code == 1
    report = bad.json()
    assert report["state"] == "failed" and "1 problem(s)" in report["steps"][0]["error"]
    assert f"{newest.id} {newest.artifacts[0].key}: " in report["steps"][0]["error"]
    assert f"expected sha256 {newest.artifacts[0].sha256}" in report["steps"][0]["error"]

    records = _audit(vw)
    assert [(r.outcome, r.target) for r in records] == [("failed", g.name), ("succeeded", g.name),
                                                        ("dry-run", g.name)]
    assert records[0].params == {"domain": g.name} and records[0].job_id == report["job_id"]
    assert "@" in records[0].actor
    parent = vw.cli("job", report["job_id"], "--json").json()
    assert (parent["kind"], parent["state"]) == ("runbook", "failed")
    shown = vw.cli("job", report["job_id"])  # for people: params and result as JSON, not Python's repr
    assert shown.code == 1 and f'"domain": "{g.name}"' in shown.out
    assert "{'" not in shown.out and "None" not in shown.out


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_a_bad_parameter_starts_nothing(vw, guest_factory):
    vw.start_worker()
    r = vw.cli("runbook", "run", "drill-now", "-p", "domian=x")
    assert r.code == 3 and "unknown parameter 'domian' (did you mean 'domain'?)" in r.err
    r = vw.cli("runbook", "run", "drill-noww")
    assert r.code == 4 and "no runbook named 'drill-noww' (did you mean 'drill-now'?)" in r.err
    assert vw.cli("jobs", "--json").json() == [] and _audit(vw) == []


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_restore_at_runbook_restores_the_point_of_that_time(vw, guest_factory, tmp_path):
    from datetime import datetime

    from tests.guests import images_equal

    g = guest_factory(disks=1, size_mib=16)
    vw.extra["restore"] = {"allowed_dirs": [str(tmp_path)]}  # a runbook's restores are confined
    vw.start_worker()
    g.write("vda", 0, MiB, pattern=0x11)
    assert vw.cli("backup", g.name, "--wait").code == 0
    first = g.shadow_copy("vda", tmp_path / "first.raw")
    between = datetime.now(UTC).isoformat()
    g.write("vda", 0, MiB, pattern=0x22)
    assert vw.cli("backup", g.name, "--wait").code == 0

    out = tmp_path / "restored"
    r = vw.cli("runbook", "run", "restore-at", "-p", f"domain={g.name}", "-p", f"at={between}",
               "-p", f"to_dir={out}", "--json")
    assert r.code == 0, r.err
    step = r.json()["steps"][0]
    assert step["state"] == "succeeded"
    assert images_equal(out / "vda.qcow2", first)
    assert _audit(vw)[0].outcome == "succeeded"


@pytest.mark.libvirt
@pytest.mark.cli_in_process
def test_an_api_killed_while_it_drives_a_runbook_leaves_its_run_failed_saying_so_and_its_step_running_on(
        vw, api, guest_factory, tmp_path):
    """SIGKILL of the API process whose thread drives a runbook (its drill step running):
    the run's lease runs out, a worker fails the run saying the process that ran it
    stopped, and the drill it had started runs on to success."""
    import yaml
    from virtwarden.catalog import jobs as job_rows

    from tests.harness import wait_for
    from tests.test_api import TOKEN

    marker = "VW-RUNBOOK-KILL-BOOTED"
    g = guest_factory(disks=1, size_mib=16, boot_marker=marker.encode())
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(yaml.safe_dump({
        "apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": "drilled"},
        "spec": {"selector": {"domains": [g.name]}, "backup": {"target": "nfs"},
                 "drill": {"run_for": "6s", "serial_marker": marker}}}))
    vw.extra["policy_dir"] = str(pdir)
    vw.start_worker()
    assert vw.cli("backup", g.name, "--wait").code == 0
    api.tokens.write_text(f"ops:read,runbook,drill:{TOKEN}\n")
    server = api()
    r = server.call("POST", "/v1/runbooks/drill-now/runs", {"params": {"domain": g.name}})
    assert r.status == 202, r.body
    run_id = r.json()["job_id"]
    cat = vw.catalog()
    drill = wait_for(lambda: next((j for j in job_rows.recent(cat, limit=20)
                                   if j.kind == "drill" and j.state == "running"), None), 60, "the drill step to run")
    server.stop(graceful=False)  # SIGKILL: its thread driving the run dies with it

    run = wait_for(lambda: (j := job_rows.get(cat, run_id)).finished and j, 60, "the run to be failed")
    assert run.state == "failed" and "the process running it stopped before it finished" in run.error, run.error
    step = wait_for(lambda: (j := job_rows.get(cat, drill.id)).finished and j, 120, "the drill to end")
    assert step.state == "succeeded", step.error
